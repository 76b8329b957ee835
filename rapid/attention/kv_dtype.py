"""The KV pool's element type: the model's own, bfloat16, or a one-byte float8 (vLLM's kv_cache_dtype="fp8").

Float8 values are stored saturated (clamped to the format's largest finite value, then rounded to nearest even)
with no scale: the keys and values of the models this engine runs sit well inside fp8's range. Every reader converts
them back to the query's dtype before it multiplies, so attention itself runs in 16 or 32 bits.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """'auto' -> the model's dtype; 'bfloat16' | 'fp8' | 'fp8_e4m3' | 'fp8_e5m2' -> that dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(KV_DTYPES)}, got {kv_cache_dtype!r}")
    return KV_DTYPES[kv_cache_dtype]


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def dots_in_float16(pool_dtype: torch.dtype, q_dtype: torch.dtype) -> bool:
    """Whether the Triton kernels multiply in float16: a float8 pool under bf16 queries (float16 holds float8 exactly
    and converts from it more cheaply than bf16 does; the queries are clamped to its range)."""
    return is_float8(pool_dtype) and q_dtype == torch.bfloat16


def to_kv(x: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype: float8 saturates at the format's largest value (a plain cast may give NaN)."""
    if is_float8(kv_dtype):
        limit = torch.finfo(kv_dtype).max
        return x.clamp(-limit, limit).to(kv_dtype)
    return x.to(kv_dtype)


def float8_unsupported(kv_cache_dtype: str, backend: str, capability: tuple[int, int]) -> str | None:
    """Why the `backend` attention cannot run a `kv_cache_dtype` pool on a GPU of this compute capability, or None.
    Triton converts float8 only on compute capability 8.9 and newer (Ada, Hopper, Blackwell)."""
    if not kv_cache_dtype.startswith("fp8") or backend != "triton" or tuple(capability) >= (8, 9):
        return None
    major, minor = capability
    return (f"kv_cache_dtype {kv_cache_dtype!r} needs a GPU of compute capability 8.9 or newer for the Triton "
            f"attention kernels (their float8 conversions); this GPU is {major}.{minor}: use kv_cache_dtype 'auto' "
            "or 'bfloat16', or attention_backend 'reference' (torch ops, slow)")


def as_bytes(pool: torch.Tensor) -> torch.Tensor:
    """A float8 pool as uint8 (same bytes), for the copy and index ops torch has no float8 kernels of; else pool."""
    return pool.view(torch.uint8) if is_float8(pool.dtype) else pool

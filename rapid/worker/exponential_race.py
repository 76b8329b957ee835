"""Random sampling as an exponential race: token = argmax(x * scale - log(q)), q ~ Exponential(1) per token.

argmax(p_i / q_i) with p = softmax(x * scale) is a draw from p, and since log p_i = x_i * scale - logsumexp, the
argmax needs neither the softmax nor its normaliser.

A seeded row's noise comes from a counter-based hash of its 64-bit key (mix_seed(seed, step)) and the token id, not
from a generator's state: its draw depends on its key alone, in any batch and any process, and the CPU and CUDA draw
the same noise (up to the rounding of log). On CUDA every row's noise is hashed (unseeded rows get fresh keys from
the engine's generator), in one Triton pass over the logits (rapid.worker.exponential_race_kernel): a seeded row
costs nothing more. Elsewhere unseeded rows take their noise from the generator (`exponential_`, cheaper on a CPU
than the hash) and only seeded rows are hashed.

    key (int64) -> lo, hi (32 bits each)
    r1 = H(lo), r2 = H(H(hi ^ r1) + 0x9E3779B9)          per row
    h = H(H(token ^ r1) ^ r2)                           per (row, token)
    u = ((h >> 9) + 0.5) / 2**23, in [2**-24, 1 - 2**-24];  q = -log(u) > 0
H is Chris Wellons' "lowbias32" integer hash (a bijection of 32-bit words). 23 bits keep u + 0.5 exact in float32
and u below 1 (with 24, the top value rounded to u = 1, q = 0: a token that always won).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rapid.worker.transfer import to_device

__all__ = ["hashed_exponential", "race_argmax_reference", "random_keys", "sample_race", "triton_available"]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_KEY_LIMIT = 1 << 62  # unseeded rows draw keys in [0, 2**62); mix_seed's keys are in [0, 2**63)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (c split in 16-bit halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_exponential(keys: Tensor, vocab_size: int) -> Tensor:
    """keys [R] int64 (>= 0) -> q [R, V] float32, Exponential(1) noise of each (row, token)."""
    keys = keys.to(torch.int64)
    r1 = _hash32(keys & _M32)  # [R]
    r2 = _hash32((_hash32((keys >> 32) ^ r1) + _GOLDEN) & _M32)  # [R]
    col = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = _hash32(_hash32(col[None, :] ^ r1[:, None]) ^ r2[:, None])  # [R, V]
    u = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(u)


def race_argmax_reference(x: Tensor, scale: Tensor, keys: Tensor) -> Tensor:
    """x [B, V] float32, scale [B], keys [B] int64 -> tokens [B] int64 (first index on ties): every row hashed."""
    return (x * scale[:, None] - torch.log(hashed_exponential(keys, x.shape[1]))).argmax(dim=-1)


def random_keys(batch_size: int, device: torch.device, generator: torch.Generator | None,
                seeded_rows: list[int], seeded_keys: list[int]) -> Tensor:
    """[B] int64 keys: fresh ones from `generator` (drawn on its device, no host sync), then the seeded rows'."""
    gen_device = generator.device if generator is not None else device
    keys = torch.randint(0, _KEY_LIMIT, (batch_size,), dtype=torch.int64, device=gen_device, generator=generator)
    keys = keys.to(device)
    if seeded_rows:
        keys[to_device(seeded_rows, torch.int64, device)] = to_device(seeded_keys, torch.int64, device)
    return keys


def sample_race(x: Tensor, scale: Tensor, generator: torch.Generator | None, seeded_rows: list[int],
                seeded_keys: list[int]) -> Tensor:
    """x [B, V] float32 (masked tokens -inf), scale [B] -> tokens [B] int64, a draw from softmax(x * scale) per row.
    `seeded_keys[i]`: the key of row `seeded_rows[i]`; the other rows draw from `generator` (None: torch's default)."""
    B, V = x.shape
    if x.is_cuda and triton_available():
        from rapid.worker.exponential_race_kernel import race_argmax

        return race_argmax(x, scale, random_keys(B, x.device, generator, seeded_rows, seeded_keys))
    q = torch.empty_like(x, dtype=torch.float32).exponential_(generator=generator)  # [B, V]
    q.clamp_min_(torch.finfo(torch.float32).tiny)  # exponential_ may return 0
    if seeded_rows:
        rows = to_device(seeded_rows, torch.int64, x.device)
        q[rows] = hashed_exponential(to_device(seeded_keys, torch.int64, x.device), V)
    return (x * scale[:, None] - torch.log(q)).argmax(dim=-1)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (CUDA kernels of the sampler; the tensor code stands in without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

"""Random sampling in one pass over the logits: token = argmax(x * scale - log(q)), q ~ Exponential(1).

This is the exponential race: argmax(p_i / q_i) with p = softmax(x * scale) is a draw from p, and since
log p_i = x_i * scale - logsumexp(x * scale), the argmax needs neither the softmax nor its normaliser.

The noise q of (row, token) comes from a counter-based hash of the row's 64-bit key and the token id,
not from a generator's state. So a row's draw depends on its key alone: a seeded row costs what any
row costs (no generator to reseed, no kernel of its own), and every device draws the same noise (up to
the rounding of log). On CUDA one Triton kernel reads the logits once; elsewhere the same arithmetic runs
as tensor code (`race_argmax_reference`), bit for bit the same hash.

    key (int64) -> lo, hi (32 bits each)
    r1 = hash32(lo), r2 = hash32(hi ^ r1)                     per row
    h = hash32(hash32(token ^ r1) ^ r2)                      per (row, token)
    u = (h >> 8 + 0.5) / 2**24 in (0, 1);  q = -log(u)
hash32 is Chris Wellons' "lowbias32" integer hash (a bijection of 32-bit words).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from rapid.worker.transfer import to_device

__all__ = ["launch_race", "race_argmax", "race_argmax_reference", "random_keys"]

_M32 = 0xFFFFFFFF
_KEY_LIMIT = 1 << 62  # unseeded rows draw keys in [0, 2**62); mix_seed's keys are in [0, 2**63)


# ------------------------------------------------------------------------------------------------ tensor code


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


def race_argmax_reference(x: Tensor, scale: Tensor, keys: Tensor) -> Tensor:
    """x [B, V] float32, scale [B] float32, keys [B] int64 (>= 0) -> tokens [B] int64 (first index on ties)."""
    B, V = x.shape
    keys = keys.to(torch.int64)
    r1 = _hash32(keys & _M32)  # [B]
    r2 = _hash32((keys >> 32) ^ r1)  # [B]
    col = torch.arange(V, device=x.device, dtype=torch.int64)
    h = _hash32(_hash32(col[None, :] ^ r1[:, None]) ^ r2[:, None])  # [B, V]
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    score = x * scale[:, None] - torch.log(-torch.log(u))  # [B, V]
    return score.argmax(dim=-1)


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def _hash32_tl(x):
    """lowbias32 on uint64 words holding 32 bits (products stay below 2**64: exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _race_kernel(X, SCALE, KEYS, PART_VAL, PART_IDX, V, stride_x, part_len, num_parts, BLOCK: tl.constexpr):
    """Program (row, part): the best score and its token over tokens [part * part_len, +part_len)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    key = tl.load(KEYS + row).to(tl.uint64)
    r1 = _hash32_tl(key & 0xFFFFFFFF)
    r2 = _hash32_tl((key >> 32) ^ r1)
    scale = tl.load(SCALE + row)
    start = part * part_len
    end = tl.minimum(start + part_len, V)
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = start + offs
    x_row = X + row.to(tl.int64) * stride_x
    for c in range(start, end, BLOCK):
        col = c + offs
        m = col < end
        x = tl.load(x_row + col, mask=m, other=float("-inf"))
        h = _hash32_tl(_hash32_tl(col.to(tl.uint64) ^ r1) ^ r2)
        u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # / 2**24
        score = tl.where(m, x * scale - tl.log(-tl.log(u)), float("-inf"))
        better = score > best  # strict: the earlier token keeps a tie within a lane
        best = tl.where(better, score, best)
        best_idx = tl.where(better, col, best_idx)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, 2147483647), 0)
    tl.store(PART_VAL + row * num_parts + part, top)
    tl.store(PART_IDX + row * num_parts + part, idx)


def race_argmax(x: Tensor, scale: Tensor, keys: Tensor) -> Tensor:
    """x [B, V] float32, scale [B], keys [B] int64 -> tokens [B] int64: the Triton kernel on CUDA (the
    vocabulary cut into parts until about two programs per SM run), race_argmax_reference elsewhere."""
    if not x.is_cuda:
        return race_argmax_reference(x, scale, keys)
    return launch_race(x, scale, keys, parts=-(-2 * _num_sms(x.device.index) // max(1, x.shape[0])))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_race(x: Tensor, scale: Tensor, keys: Tensor, parts: int, block: int = 2048) -> Tensor:
    """The Triton kernel over (row, part) with at most `parts` parts of whole blocks, then an argmax over
    the parts (the first part on ties, so the lowest token). Any device Triton runs on (its interpreter too)."""
    B, V = x.shape
    if B == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    parts = max(1, min(parts, -(-V // block)))
    part_len = -(-(-(-V // parts)) // block) * block  # ceil(V / parts), rounded up to whole blocks
    parts = -(-V // part_len)
    part_val = torch.empty((B, parts), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((B, parts), dtype=torch.int32, device=x.device)
    _race_kernel[(B, parts)](x, scale.to(torch.float32).contiguous(), keys.to(torch.int64).contiguous(), part_val,
                             part_idx, V, x.stride(0), part_len, parts, BLOCK=block, num_warps=8)
    if parts == 1:
        return part_idx[:, 0].to(torch.int64)
    best_part = part_val.argmax(dim=1, keepdim=True)  # [B, 1]
    return part_idx.gather(1, best_part)[:, 0].to(torch.int64)


def random_keys(batch_size: int, device: torch.device, generator: torch.Generator | None,
                seeded_rows: list[int], seeded_keys: list[int]) -> Tensor:
    """[B] int64 keys: fresh ones from `generator` (drawn on its device, no host sync), then the seeded rows'."""
    gen_device = generator.device if generator is not None else device
    keys = torch.randint(0, _KEY_LIMIT, (batch_size,), dtype=torch.int64, device=gen_device, generator=generator)
    keys = keys.to(device)
    if seeded_rows:
        keys[to_device(seeded_rows, torch.int64, device)] = to_device(seeded_keys, torch.int64, device)
    return keys

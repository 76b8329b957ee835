"""The exponential race of rapid.worker.exponential_race in one Triton pass over the logits: every row's noise
hashed from its key, bit for bit the hash of `hashed_exponential`."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch_race", "num_sms", "parts_per_row", "race_argmax", "split_vocab"]


@triton.jit
def _hash32(x):
    """lowbias32 on uint64 words holding 32 bits (products stay below 2**64: exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["num_parts"])  # one compiled variant for every batch size
def _race_kernel(X, SCALE, KEYS, PART_VAL, PART_IDX, V, stride_x, part_len, num_parts, BLOCK: tl.constexpr):
    """Program (row, part): the best score and its token over tokens [part * part_len, +part_len)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    key = tl.load(KEYS + row).to(tl.uint64)
    r1 = _hash32(key & 0xFFFFFFFF)
    r2 = _hash32((_hash32((key >> 32) ^ r1) + 0x9E3779B9) & 0xFFFFFFFF)
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
        h = _hash32(_hash32(col.to(tl.uint64) ^ r1) ^ r2)
        u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # / 2**23: in [2**-24, 1 - 2**-24]
        score = tl.where(m, x * scale - tl.log(-tl.log(u)), float("-inf"))
        better = score > best  # strict: the earlier token keeps a tie within a lane
        best = tl.where(better, score, best)
        best_idx = tl.where(better, col, best_idx)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, 2147483647), 0)
    tl.store(PART_VAL + row * num_parts + part, top)
    tl.store(PART_IDX + row * num_parts + part, idx)


def race_argmax(x: Tensor, scale: Tensor, keys: Tensor) -> Tensor:
    """x [B, V] float32 on CUDA, scale [B], keys [B] int64 -> tokens [B] int64, the vocabulary cut into parts until
    about two programs per SM run."""
    return launch_race(x, scale, keys, parts=parts_per_row(x))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """The device's streaming multiprocessors (asked once per device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parts_per_row(x: Tensor) -> int:
    """Parts to cut each row of x [B, V] (on CUDA) into, so that about two programs per SM run."""
    return -(-2 * num_sms(x.device.index) // max(1, x.shape[0]))


def split_vocab(vocab_size: int, parts: int, block: int) -> tuple[int, int]:
    """(part_len, parts): at most `parts` parts of a row, each a whole number of blocks (the last may be short)."""
    parts = max(1, min(parts, -(-vocab_size // block)))
    part_len = -(-(-(-vocab_size // parts)) // block) * block  # ceil(V / parts), rounded up to whole blocks
    return part_len, -(-vocab_size // part_len)


def launch_race(x: Tensor, scale: Tensor, keys: Tensor, parts: int, block: int = 2048) -> Tensor:
    """The kernel over (row, part) with at most `parts` parts of whole blocks, then an argmax over the parts (the
    first part on ties, so the lowest token). Any device Triton runs on (its interpreter too)."""
    B, V = x.shape
    if B == 0 or V == 0:
        return torch.zeros(B, dtype=torch.int64, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    part_len, parts = split_vocab(V, parts, block)
    part_val = torch.empty((B, parts), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((B, parts), dtype=torch.int32, device=x.device)
    _race_kernel[(B, parts)](x, scale.to(torch.float32).contiguous(), keys.to(torch.int64).contiguous(), part_val,
                             part_idx, V, x.stride(0), part_len, parts, BLOCK=block, num_warps=8)
    if parts == 1:
        return part_idx[:, 0].to(torch.int64)
    best_part = part_val.argmax(dim=1, keepdim=True)  # [B, 1]
    return part_idx.gather(1, best_part)[:, 0].to(torch.int64)

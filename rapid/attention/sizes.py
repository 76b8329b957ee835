"""Launch sizes shared by the Triton attention kernels' wrappers."""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton's block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())

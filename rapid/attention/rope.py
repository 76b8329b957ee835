"""Rotary position embedding (rotate-half, the Hugging Face layout) as the attention backends apply it: to this
step's queries and keys in place, just before the keys are stored (the Triton backend fuses it into its KV store)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rope(NamedTuple):
    """What a backend needs to rotate a step's rows: the model's table and each row's position."""

    cos_sin: torch.Tensor  # [P, D] float32: cos of the D/2 frequencies at each position, then their sin
    positions: torch.Tensor  # [T] int64


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x rotated by angles whose cos/sin [..., D/2] broadcast against x's halves, computed in float32
    and rounded once to x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> None:
    """q [T, H, D] and k [T, KVH, D] rotated in place at rope.positions."""
    cos, sin = rope.cos_sin[rope.positions].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    q.copy_(rotate_half(q, cos, sin))
    k.copy_(rotate_half(k, cos, sin))

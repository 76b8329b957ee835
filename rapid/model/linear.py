"""nn.Linear that runs one token's product through the Triton GEMV of rapid/model/gemv.py once told to (CUDA).

This module imports no Triton: the kernel's module is imported on first use, so the CPU needs none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class GemvConfig(NamedTuple):
    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 2
    num_stages: int = 3


def config_for(in_features: int) -> GemvConfig:
    """The sweep's choice on the H200 (bench/results/session30/call2/gemv-sweep.json): two rows a program, 2048
    columns at a time, 2 warps was within 0.4% of the best at every Llama-3.1-8B shape (in_features 4096, 14336), so
    every shape gets it; in_features is where a per-shape choice would go."""
    return GemvConfig()


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T is a product the GEMV computes: one row of the weight's width and dtype, the weight's
    rows contiguous. Anything else goes to torch, which also raises torch's own error for a wrong input."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] == weight.shape[1] and x.dtype == weight.dtype
            and weight.stride(1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig | None) -> torch.Tensor:
    """x @ weight^T + bias: through the GEMV when `config` is given and gemv_applies, else torch's F.linear."""
    if config is None or not gemv_applies(x, weight):
        return nn.functional.linear(x, weight, bias)
    from rapid.model.gemv import gemv

    y = gemv(x.contiguous(), weight, config)  # [1, out_features]
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear whose one-token product runs the Triton GEMV once `use_gemv` gave it a configuration."""

    gemv_config: GemvConfig | None = None

    def use_gemv(self, on: bool) -> None:
        self.gemv_config = config_for(self.in_features) if on else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv_config)

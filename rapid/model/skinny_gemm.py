"""The model's linear layer: F.linear, or for a few rows on CUDA a Triton GEMM (skinny_gemm_kernel.py).

At batch 1 a decode step is a stream of weight reads, and cuBLAS reads the smaller Llama-3.1-8B projections well
below the copy rate on the H200 (bench/results/session27/call3/gemm-shapes.md: the fused QKV at 3.48 TB/s, the
attention output at 2.57, the down projection at 3.77, against 4.24-4.42 for gate/up and the LM head).

`rapid_linear` is a torch custom op: opaque to torch.compile, captured by CUDA graphs as any kernel. It runs the
Triton kernel for 1 to SKINNY_MAX_ROWS rows on CUDA (decode batches up to 16) and F.linear otherwise, the CPU
included. Importing this module needs no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_MAX_ROWS = 16  # rows (tokens) up to which the Triton kernel runs; tl.dot pads them to 16


@torch.library.custom_op("rapid::linear", mutates_args=())
def rapid_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K] -> [T, N]; on CUDA with T <= SKINNY_MAX_ROWS, the Triton kernel."""
    if x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS:
        from rapid.model.skinny_gemm_kernel import skinny_matmul

        return skinny_matmul(x, weight, bias)
    return F.linear(x, weight, bias)


@rapid_linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Linear):
    """nn.Linear (the same parameters and names) whose forward on CUDA is rapid_linear, when `skinny` (the default)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, skinny: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.skinny = skinny

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and x.is_cuda:  # (on the CPU the op would only add its dispatch, about 13 us a call)
            return rapid_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

"""A Triton matrix-vector product for one token: y[N] = W[N, K] @ x[K], optionally after a residual add and RMSNorm.

At batch 1 a decode step's projections are matrix-vector products that only read their weight. cuBLAS reads the
small ones (the fused QKV, o_proj, down_proj) at 2.6-3.7 TB/s on the H200 against a copy rate of 4.3
(bench/results/session28/call2/gemm-shapes.md). Each program here reads BLOCK_N whole rows of W, BLOCK_K columns at a
time, and accumulates w * x elementwise in float32, summing over K once at the end; many small programs keep enough
loads in flight. With NORM, x is first RMS-normed (and with ADD, x = a + b first; program 0 writes that sum out):
the norm's own kernel, and its launch, disappear.

Rounding follows the unfused code in rapid/model/llama.py: the sum is rounded to the activation dtype, the normed
value too, then it is scaled by the norm weight and rounded once more before the product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class GemvConfig(NamedTuple):
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _gemv_kernel(
    a_ptr, b_ptr, sum_ptr, norm_w_ptr, w_ptr, y_ptr, N, K, stride_w, eps,
    ADD: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    act = a_ptr.dtype.element_ty
    inv_rms = 1.0
    if NORM:  # one pass over x for its mean square (x is K values: it stays in L2)
        sq = tl.zeros((BLOCK_K,), tl.float32)
        for k in range(0, K, BLOCK_K):
            c = k + cols
            x = tl.load(a_ptr + c, mask=c < K, other=0.0).to(tl.float32)
            if ADD:
                x = (x + tl.load(b_ptr + c, mask=c < K, other=0.0).to(tl.float32)).to(act).to(tl.float32)
                if pid == 0:
                    tl.store(sum_ptr + c, x.to(act), mask=c < K)
            sq += x * x
        inv_rms = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k in range(0, K, BLOCK_K):
        c = k + cols
        col_ok = c < K
        x = tl.load(a_ptr + c, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        if NORM:
            if ADD:
                x = (x + tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)).to(act).to(tl.float32)
            x = (x * inv_rms).to(act).to(tl.float32)
            x = (x * tl.load(norm_w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)).to(act).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + c[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]  # [BLOCK_N, BLOCK_K]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig = GemvConfig(), *,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [1, K], weight [N, K] -> (y [1, N], x + residual [1, K] or None).

    norm_weight: RMS-norm x (after adding residual, when given) before the product."""
    if residual is not None and norm_weight is None:
        raise ValueError("residual is only added before a norm: pass norm_weight too")
    N, K = weight.shape
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    grid = (triton.cdiv(N, config.block_n),)
    _gemv_kernel[grid](
        x, residual if residual is not None else x, total if total is not None else x,
        norm_weight if norm_weight is not None else x, weight, y, N, K, weight.stride(0), eps,
        ADD=residual is not None, NORM=norm_weight is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y, total

"""A Triton matrix-vector product for one token: y[1, N] = x[1, K] @ W[N, K]^T (rapid/model/linear.py uses it).

At batch 1 a decode step's projections only read their weights. cuBLAS reads the small ones (the fused QKV,
o_proj, down_proj) at 2.6-3.8 TB/s on the H200, against a copy rate of 4.3. Each program here reads BLOCK_N whole
rows of W, BLOCK_K columns at a time, accumulates w * x elementwise in float32 and sums over K once at the end:
thousands of small programs keep enough loads in flight. bench/gemv_sweep.py chose the configuration
(bench/results/session30/call2): every projection of a Llama-3.1-8B step ran faster than cuBLAS, the step's
products 3.61 ms against 3.93; the engine's batch-1 decode step took 4.143 ms against 4.496 with cuBLAS (call 5).
A fused form (residual add + RMSNorm in the prologue) was measured in call 1 and did not pay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k in range(0, K, BLOCK_K):
        c = k + cols
        col_ok = c < K
        x = tl.load(x_ptr + c, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        w = tl.load(w_ptr + rows[:, None] * stride_w + c[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]  # [BLOCK_N, BLOCK_K]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (rows contiguous: rapid.model.linear.gemv_applies) -> y [1, N] in x's dtype.

    config: (block_n, block_k, num_warps, num_stages), a rapid.model.linear.GemvConfig."""
    block_n, block_k, num_warps, num_stages = config
    N, K = weight.shape
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, y, N, K, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages,
    )
    return y

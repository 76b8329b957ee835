"""The Triton kernel of rapid.model.skinny_gemm: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for M <= 16 rows.

Each program reads BLOCK_N whole rows of w, K in BLOCK_K steps, and multiplies them by all M rows of x (padded to 16
for tl.dot) into a float32 accumulator: no split of K, so no second pass and no atomics. The block sizes are tuned
per (N, K) by Triton's autotuner on first use of a shape, which must come before any CUDA graph capture (the graph
runners warm every shape up first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tl.dot's smallest M: the rows of x are padded to it
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 4, 6), (32, 128, 4, 5), (32, 256, 4, 4),
                              (32, 512, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3))]


@triton.jit
def _skinny_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program n: y[:, n * BLOCK_N : +BLOCK_N] over all of K."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))  # [BLOCK_M, BLOCK_N]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_tuned_kernel = triton.autotune(configs=CONFIGS, key=["N", "K"])(_skinny_kernel)


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: dict | None = None) -> torch.Tensor:
    """x [M, K], w [N, K], bias [N] or None -> [M, N] in x's dtype, M <= 16. `config` ({"BLOCK_N", "BLOCK_K",
    "num_warps", "num_stages"}) skips the autotuner: tests, and Triton's interpreter."""
    M, K = x.shape
    N = w.shape[0]
    if M > BLOCK_M or w.shape[1] != K:
        raise ValueError(f"skinny_matmul takes at most {BLOCK_M} rows and w [N, {K}], got x {tuple(x.shape)} "
                         f"and w {tuple(w.shape)}")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    args = (x, w, bias if bias is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0))
    if config is None:
        _tuned_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, HAS_BIAS=bias is not None,
                                                                       BLOCK_M=BLOCK_M)
    else:
        _skinny_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](*args, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
                                                             **config)
    return y

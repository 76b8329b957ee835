"""A split-K Triton GEMM for a decode step's skinny products: y[M, N] = x[M, K] @ W[N, K]^T, M = 1..128 tokens.

At batch 16-128 the projections are still memory-bound: the time is reading W once. cuBLAS and cuBLASLt reach ~3.9
TB/s of the H200's ~4.3 at M=64 and lose most on the small shapes (the fused QKV 6144x4096, o_proj 4096x4096, down
4096x14336), where N / BLOCK_N programs are too few to keep every SM's loads in flight. An earlier Triton GEMM whose
programs read whole rows of W over all of K lost to cuBLAS for that reason. Here program (n_block, k_split) reads a
[BLOCK_N, K / SPLIT_K] slice of W, BLOCK_K columns at a time (`num_stages` loads in flight), and multiplies it with
x's matching columns on the tensor cores (tl.dot, x's rows padded to BLOCK_M >= 16): cdiv(N, BLOCK_N) * SPLIT_K
programs. With SPLIT_K > 1 each program stores its fp32 partial product in a workspace [SPLIT_K, M, N] and a second
small kernel adds the SPLIT_K partials in a fixed order (no atomics: the same bits run to run, eager or replayed in a
CUDA graph) and casts them to y's dtype. The wrapper reads no device data and allocates with torch.empty, so it can
be captured in a CUDA graph and traced by torch.compile (a user-defined Triton kernel).
bench/splitk_gemm_sweep.py times the configurations against cuBLAS and cuBLASLt on the GPU.

An experiment, not used by the engine: in its first sweep on the H200 (bench/results/session32/call1) it lost to
cuBLASLt on every layer GEMM at M=64 (32 layers' products: 3.96 against 3.75 ms) and won only on the LM head (250
against 270 us); at M=16 it won o_proj, down and the LM head by 3-12%, about 0.1 ms a step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_M = 128  # more rows than this: a compute-bound product, cuBLAS's
REDUCE_BLOCK = 1024  # elements of y per program of the reduction


class SplitKConfig(NamedTuple):
    block_n: int  # rows of W (columns of y) per program, >= 16
    block_k: int  # columns of K per loop step, >= 16
    split_k: int  # programs along K; 1: no workspace, no reduction
    num_warps: int
    num_stages: int  # loads in flight in the K loop (software pipelining)


@triton.jit
def _splitk_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, k_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        PARTIALS: tl.constexpr):
    """Program (n_block, s): acc[BLOCK_M, BLOCK_N] = x[:, K_s] @ W[n_block rows, K_s]^T over split s's columns K_s =
    [s * k_per_split, min((s + 1) * k_per_split, K)), k_per_split a multiple of BLOCK_K. PARTIALS: store acc in fp32
    at out[s] (out: [SPLIT_K, M, N]); else cast to out's dtype (out: y [M, N])."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and y; rows >= M are padding
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W, columns of y
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    row_ok, col_ok = rows < M, cols < N
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[:, None] * stride_w + ks[None, :]  # [BLOCK_N, BLOCK_K]
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):  # pipelined over num_stages (a launch option)
        if EVEN_K:  # K % BLOCK_K == 0: every step is whole, the loads keep their vector width
            x = tl.load(x_ptrs + k, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + k, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k + ks) < K  # [BLOCK_K]; only the last split's last step is short
            x = tl.load(x_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:  # as torch's fp32 product: no TF32
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    mask = row_ok[:, None] & col_ok[None, :]
    if PARTIALS:  # out: workspace [SPLIT_K, M, N] fp32
        out_ptrs = out_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc, mask=mask)
    else:  # out: y [M, N]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_partials_kernel(ws_ptr, y_ptr, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y.flat[i] = (((ws[0].flat[i] + ws[1].flat[i]) + ws[2].flat[i]) + ...) in fp32, cast to y's dtype: one fixed
    order, so the same bits on every run. ws: [SPLIT_K, M, N] fp32, size = M * N."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat indices of y
    ok = offs < size
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * size + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def k_per_split(K: int, config: SplitKConfig) -> int:
    """Columns of K per split: K / split_k rounded up to whole BLOCK_K steps (the last split may be shorter or, for a
    K of few steps, empty: its partial is then zero)."""
    return triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k


def splitk_gemm(x: torch.Tensor, weight: torch.Tensor, config: SplitKConfig) -> torch.Tensor:
    """x [M, K] (rows contiguous), weight [N, K] (rows contiguous) -> y [M, N] = x @ weight^T in x's dtype.

    fp32 products in fp32 (no TF32); bf16 / fp16 products accumulate in fp32. M <= MAX_M."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_M:
        raise ValueError(f"splitk_gemm takes at most {MAX_M} rows, got {M}")
    if weight.shape[1] != K or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} need the same K and rows contiguous")
    if weight.stride(0) * N >= 2**31:  # the kernel's offsets are int32
        raise ValueError(f"weight {tuple(weight.shape)} has 2**31 elements or more")
    block_n, block_k, split_k, num_warps, num_stages = config
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    partials = split_k > 1
    out = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if partials else y
    _splitk_gemm_kernel[(triton.cdiv(N, block_n), split_k)](
        x, weight, out, M, N, K, x.stride(0), weight.stride(0), k_per_split(K, config),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        PARTIALS=partials, num_warps=num_warps, num_stages=num_stages,
    )
    if partials:
        _reduce_partials_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            out, y, M * N, SPLIT_K=split_k, BLOCK=REDUCE_BLOCK, num_warps=4)
    return y

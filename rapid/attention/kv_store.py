"""The Triton KV store: each row's keys and values into its pool slot, with the row's queries and keys rotated (rope)
in place on the way, so that a layer pays one small kernel for both (rapid/attention/rope.py has the torch form)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rapid.attention.kv_dtype import is_float8
from rapid.attention.rope import Rope
from rapid.attention.sizes import next_pow2


@triton.jit
def _rotate_rows(X, heads, stride_h, NUM_HEADS: tl.constexpr, j, HALF: tl.constexpr, cos, sin, ROPE: tl.constexpr):
    """One token's rows X[heads] [N, D] as their halves (x1, x2) [N, D/2], rotated (written back in place) if ROPE."""
    mask = (heads[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    ptr = X + heads[:, None] * stride_h + j[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    if ROPE:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (f1 * cos - f2 * sin).to(X.dtype.element_ty)
        x2 = (f2 * cos + f1 * sin).to(X.dtype.element_ty)
        tl.store(ptr, x1, mask=mask)
        tl.store(ptr + HALF, x2, mask=mask)
    return x1, x2, mask


@triton.jit
def _rope_store_kernel(
    Q, K, V, KC, VC, SLOTS, POS, COS_SIN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch, stride_cs,
    BLOCK_SIZE: tl.constexpr, NUM_Q_HEADS: tl.constexpr, Q_BLOCK: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROPE: tl.constexpr, KV_MAX: tl.constexpr,
):
    """Program (token t, part p). Part 0: rope t's keys in place (if ROPE), then copy its keys and values [KVH, D]
    to slot SLOTS[t] (skipped when < 0). Part p >= 1 (only with ROPE): rope query heads [(p-1) Q_BLOCK, p Q_BLOCK)
    in place. Small batches thus run a few short programs side by side, not one long one."""
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    j = tl.arange(0, HALF_PAD)
    slot = tl.load(SLOTS + t).to(tl.int64)
    cos = 0.0
    sin = 0.0
    if ROPE:
        row = tl.load(POS + t).to(tl.int64) * stride_cs
        cos = tl.load(COS_SIN + row + j, mask=j < HALF, other=0.0)[None, :]  # [1, D/2] float32
        sin = tl.load(COS_SIN + row + HALF + j, mask=j < HALF, other=0.0)[None, :]
    if part == 0:
        h = tl.arange(0, H_PAD)
        k1, k2, mask = _rotate_rows(K + t * stride_kt, h, stride_kh, NUM_KV_HEADS, j, HALF, cos, sin, ROPE)
        if slot >= 0:
            dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + h[:, None] * stride_ch + j[None, :]
            src = V + t * stride_vt + h[:, None] * stride_vh + j[None, :]
            v1, v2 = tl.load(src, mask=mask), tl.load(src + HALF, mask=mask)
            if KV_MAX > 0:  # a float8 pool: saturate, as rapid.attention.kv_dtype.to_kv does (exact in 16 bits)
                k1 = tl.clamp(k1.to(tl.float32), -KV_MAX, KV_MAX).to(k1.dtype)
                k2 = tl.clamp(k2.to(tl.float32), -KV_MAX, KV_MAX).to(k2.dtype)
                v1 = tl.clamp(v1.to(tl.float32), -KV_MAX, KV_MAX).to(v1.dtype)
                v2 = tl.clamp(v2.to(tl.float32), -KV_MAX, KV_MAX).to(v2.dtype)
            tl.store(KC + dst, k1.to(KC.dtype.element_ty), mask=mask)
            tl.store(KC + dst + HALF, k2.to(KC.dtype.element_ty), mask=mask)
            tl.store(VC + dst, v1.to(VC.dtype.element_ty), mask=mask)
            tl.store(VC + dst + HALF, v2.to(VC.dtype.element_ty), mask=mask)
    else:
        heads = (part - 1) * Q_BLOCK + tl.arange(0, Q_BLOCK)
        _rotate_rows(Q + t * stride_qt, heads, stride_qh, NUM_Q_HEADS, j, HALF, cos, sin, ROPE)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                   slot_mapping: torch.Tensor, rope: Rope | None) -> None:
    """q [T, H, D], k/v [T, KVH, D] (last dim contiguous): with rope, q and k rotated in place; then k and v written
    to kv_layer [2, NB, BS, KVH, D] at slot_mapping [T] (-1: not stored)."""
    T, H, D = q.shape
    KVH = k.shape[1]
    if T == 0:
        return
    if D % 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError(f"rope_and_store needs an even head_dim ({D}) and rows contiguous in their last dim")
    kc, vc = kv_layer[0], kv_layer[1]  # [NB, BS, KVH, D]
    cos_sin, positions = (rope.cos_sin, rope.positions) if rope is not None else (q, slot_mapping)
    q_block = min(8, next_pow2(H))
    parts = 1 + (-(-H // q_block) if rope is not None else 0)
    _rope_store_kernel[(T, parts)](
        q, k, v, kc, vc, slot_mapping, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), cos_sin.stride(0),
        BLOCK_SIZE=kc.shape[1], NUM_Q_HEADS=H, Q_BLOCK=q_block, NUM_KV_HEADS=KVH, H_PAD=next_pow2(KVH),
        HALF=D // 2, HALF_PAD=max(16, next_pow2(D // 2)), ROPE=rope is not None,
        KV_MAX=torch.finfo(kc.dtype).max if is_float8(kc.dtype) else 0.0,
        num_warps=2 if max(q_block, KVH) * D >= 1024 else 1,
    )

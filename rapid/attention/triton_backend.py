"""Paged attention in Triton: a KV store kernel, a split-KV decode kernel, and a paged prefill kernel (or SDPA).

Semantics are exactly those of ReferenceAttention.forward (rapid/attention/reference.py):
  1. keys/values of this step go to the pool at meta.slot_mapping (slot -1 = padding: skipped), the queries and
     keys rotated (rope) in place in the same kernel when the model passes its table (rapid/attention/kv_store.py);
  2. the first meta.num_decodes sequences are single-token decodes: a Triton paged-attention kernel
     (flash-decoding: the context is cut into `num_splits` pieces, one program per
     (sequence, kv head, split) loads each KV tile once for all query heads of its GQA group, then a
     small reduce kernel merges the pieces by their log-sum-exp; merging in the decode kernel, by the last
     program of each group to finish, measured slower on the H200: bench/results/session35);
  3. the remaining sequences are prefill chunks, each attending causally (bottom-right aligned) to its whole
     context: with prefill_attention="paged" (the engine's default) one Triton launch reads every chunk's
     context from the pool (rapid/attention/paged_prefill.py), graph-safe; with "flash", "cudnn" or "auto",
     per sequence through torch's SDPA, the context gathered from the pool only when earlier chunks exist.

CUDA-graph safety of the decode path: no host syncs; the grid depends only on the batch size and a
host upper bound of the context length (meta.max_seq_len, which the graph runner holds at
max_model_len during capture); each split's range is computed inside the kernel from seq_lens, so one
captured graph serves every context length up to that bound. Padding rows may have seq_len 0: their
output is 0.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right

from rapid.attention.kv_dtype import dots_in_float16, is_float8
from rapid.attention.kv_store import rope_and_store
from rapid.attention.metadata import AttentionMetadata
from rapid.attention.online_softmax import online_softmax_step
from rapid.attention.paged_prefill import paged_prefill_attention, step_tile_map
from rapid.attention.reference import gather_context
from rapid.attention.rope import Rope
from rapid.attention.sizes import next_pow2


@triton.jit
def _decode_kernel(
    Q, KC, VC, BT, SEQ_LENS, OUT, PART_O, PART_LSE,
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    num_splits,
    stride_qt, stride_qh,
    stride_cb, stride_co, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DIRECT: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    DOT_F16: tl.constexpr,
):
    """Program (seq, kv_head, split): attention of the GROUP query heads over one piece of the context."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE_N) * TILE_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    qmask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    if DOT_F16:  # a float8 pool under bf16 queries: float16 holds float8 exactly and converts from it more cheaply;
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)  # queries kept in its range (no inf)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, TILE_N)
    bt_row = BT + seq.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    masked_from = start
    if UNMASKED_TILES:  # the whole tiles without a row mask, then the partial one (batches 2-64: DECODE_TUNING)
        masked_from = start + tl.maximum(end - start, 0) // TILE_N * TILE_N
        for t in range(start, masked_from, TILE_N):
            tok = t + offs_n
            blk = tl.load(bt_row + tok // BLOCK_SIZE).to(tl.int64)
            row = blk * stride_cb + (tok % BLOCK_SIZE) * stride_co + head_off
            k = tl.load(KC + row[:, None] + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0).to(q.dtype)
            v = tl.load(VC + row[:, None] + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, TILE_N]
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, None)
    for t in range(masked_from, end, TILE_N):
        tok = t + offs_n
        nmask = tok < end
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = blk * stride_cb + (tok % BLOCK_SIZE) * stride_co + head_off
        kvmask = nmask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(KC + row[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)  # float8 pools: to q's dtype
        v = tl.load(VC + row[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, TILE_N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, None)

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]  # an empty range (seq_len 0, or a split past the end) gives 0
    if DIRECT:
        tl.store(OUT + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(OUT.dtype.element_ty), mask=qmask)
    else:
        base = seq.to(tl.int64) * stride_pt + heads * stride_ph + split * stride_ps  # [G_PAD]
        tl.store(PART_O + base[:, None] * HEAD_DIM + d[None, :], o, mask=qmask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(PART_LSE + base, lse, mask=g < GROUP)


@triton.jit
def _reduce_kernel(
    PART_O, PART_LSE, OUT, num_splits,
    stride_pt, stride_ph, stride_ps, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """Program (seq, head): merge the splits' partial outputs, weighted by exp2(lse)."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < num_splits
    base = seq.to(tl.int64) * stride_pt + h * stride_ph + s * stride_ps  # [S_PAD]
    lse = tl.load(PART_LSE + base, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    denom = tl.sum(w, 0)
    o = tl.load(PART_O + base[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + seq.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


# Decode settings that measured better than the defaults for some batch sizes (bench/kernels.py --sweep on the H200,
# bench/results/session32): at batch 64, context 1024, 32-token tiles on 2 warps at 2 stages, the whole tiles without
# a row mask, took 69.2 us a layer against 73.8 with the default tiles (also unmasked); 16 and 32 tied or gained.
# Batch 1 keeps the defaults and its one masked loop: with the unmasked loop its decode kernel took 0.183-0.185 ms a
# step in session 32's calls against 0.156-0.159 in session 30's. Past 64 the defaults (at 256 the best was within 1%).
DECODE_TUNING: list[tuple[int, dict]] = [
    (1, {}), (64, dict(tile_n=32, num_warps=2, num_stages=2, unmasked_tiles=True))]
# Over a float8 pool (kv_cache_dtype fp8; the same sweep, session36/call3, float16 dots): batch 64 keeps the tiles
# above (50.2 us a layer), batch 256 at context 2048 is fastest with 64-token tiles on 2 warps at 2 stages (323.8 us
# against 473.4 with the defaults).
FLOAT8_DECODE_TUNING: list[tuple[int, dict]] = DECODE_TUNING + [(1 << 31, dict(num_warps=2, num_stages=2))]


class TritonAttention:
    """Paged attention on CUDA: Triton store + split-KV decode, paged Triton (or SDPA) prefill."""

    name = "triton"
    cuda_graph_capturable = True  # decode + store: no host syncs, launch shapes from host bounds only

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 prefill_attention: str = "flash"):  # the engine passes its config's (default "paged")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.group = num_heads // num_kv_heads
        # Decode kernel tuning (measured on an H100 by bench/kernels.py; see bench/results/kernels-h100.md).
        self.tile_n = 64  # context tokens per loop iteration (any multiple of 16; need not match block_size)
        self.num_warps = 4
        self.num_stages = 3
        self.programs_per_sm = 4  # split the context until about this many programs per SM run
        self.min_split_tokens = 256  # but never pieces shorter than this (bounded by the host max length)
        self.max_splits = 64
        self.unmasked_tiles = False  # a loop over the whole context tiles without row masks before the partial one
        self.float8_dot_f16 = True  # a float8 pool under bf16 queries: both kernels' dots in float16
        # Per-batch overrides of decode_config's settings: [(max_batch, {name: value})], first match wins.
        self.tuning: list[tuple[int, dict]] = list(DECODE_TUNING)
        self.float8_tuning: list[tuple[int, dict]] = list(FLOAT8_DECODE_TUNING)  # the same over a float8 pool
        # Prefill SDPA backends, in priority order (None = torch's own choice). Flash first: torch's own
        # choice on an H100 is cuDNN, which builds an execution plan for every new (query, context) length
        # pair, 40-65 ms median and up to 1.4 s each (bench/results/sdpa-probe-h100.json): every new prompt
        # length in serving would stall its step. Math is the fallback for what flash cannot run (float32).
        self.prefill_sdpa_backends: list | None = None
        self.set_prefill_attention(prefill_attention)
        self._num_sms: int | None = None

    # ------------------------------------------------------------------ helpers
    def decode_config(self, batch: int, float8: bool = False) -> dict:
        """tile_n, num_warps, num_stages, programs_per_sm, unmasked_tiles for a decode batch (defaults, then
        self.tuning, or self.float8_tuning over a float8 pool)."""
        c = dict(tile_n=self.tile_n, num_warps=self.num_warps, num_stages=self.num_stages,
                 programs_per_sm=self.programs_per_sm, unmasked_tiles=self.unmasked_tiles)
        for max_batch, over in self.float8_tuning if float8 else self.tuning:
            if batch <= max_batch:
                c.update(over)
                break
        return c

    def num_splits(self, batch: int, max_seq_len: int, device: torch.device, programs_per_sm: int | None = None) -> int:
        """Splits of the context: a function of host values only (batch, length bound), never of data."""
        if programs_per_sm is None:
            programs_per_sm = self.decode_config(batch)["programs_per_sm"]
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 8)
        programs = max(1, batch * self.num_kv_heads)
        want = -(-self._num_sms * programs_per_sm // programs)
        by_len = max(1, -(-max(1, max_seq_len) // self.min_split_tokens))
        splits = max(1, min(want, by_len, self.max_splits))
        return min(next_pow2(splits), self.max_splits)

    def store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
              slot_mapping: torch.Tensor, rope: Rope | None = None) -> None:
        """k, v into the pool at slot_mapping; with rope, q and k rotated in place first (one kernel)."""
        rope_and_store(q, k, v, kv_layer, slot_mapping, rope)

    def decode(self, q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               max_seq_len: int, out: torch.Tensor) -> None:
        """q: [B, H, D] one token per sequence -> out [B, H, D] (a view may be given)."""
        B = q.shape[0]
        if B == 0:
            return
        kc, vc = kv_layer[0], kv_layer[1]
        assert q.stride(-1) == 1 and out.stride(-1) == 1 and kc.stride(-1) == 1
        c = self.decode_config(B, is_float8(kc.dtype))
        splits = self.num_splits(B, max_seq_len, q.device, c["programs_per_sm"])
        H, D = self.num_heads, self.head_dim
        d_pad = max(16, next_pow2(D))
        common = dict(GROUP=self.group, G_PAD=max(16, next_pow2(self.group)), HEAD_DIM=D, D_PAD=d_pad,
                      BLOCK_SIZE=kc.shape[1], TILE_N=c["tile_n"], UNMASKED_TILES=c["unmasked_tiles"],
                      DOT_F16=self.float8_dot_f16 and dots_in_float16(kc.dtype, q.dtype))
        launch = dict(num_warps=c["num_warps"], num_stages=c["num_stages"])
        grid = (B, self.num_kv_heads, splits)
        qk_scale = self.scale * 1.4426950408889634
        if splits == 1:
            _decode_kernel[grid](
                q, kc, vc, block_tables, seq_lens, out, out, out, qk_scale, 1,
                q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
                out.stride(0), out.stride(1), 0, 0, 0,
                DIRECT=True, **launch, **common,
            )
            return
        part_o = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
        # part_lse shares part_o's (seq, head, split) strides divided by D: pass those.
        _decode_kernel[grid](
            q, kc, vc, block_tables, seq_lens, out, part_o, part_lse, qk_scale, splits,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            DIRECT=False, **launch, **common,
        )
        _reduce_kernel[(B, H)](
            part_o, part_lse, out, splits,
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2), out.stride(0), out.stride(1),
            HEAD_DIM=D, D_PAD=d_pad, S_PAD=max(2, next_pow2(splits)), num_warps=4,
        )

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
        """q/k/v: [L, *, D], the last L positions of a seq_len context -> [1, H, L, D] (flash SDPA)."""
        L = q.shape[0]
        if L == seq_len and kv_layer.dtype == k.dtype:
            keys, values = k, v  # the chunk is the whole context: no gather
        else:  # the pool's values (a float8 pool's too, as every other reader sees them), in q's dtype
            keys, values = (x.to(q.dtype) for x in gather_context(kv_layer, block_table, seq_len))
        qh = q.transpose(0, 1)[None]  # [1, H, L, D]
        kh, vh = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, KVH, S, D]
        return self._sdpa(qh, kh, vh, L, seq_len, self.num_heads != self.num_kv_heads)

    def set_prefill_attention(self, choice: str) -> None:
        """paged (the engine's default: the Triton paged prefill kernel, rapid/attention/paged_prefill.py: no
        gather, no host sync) | flash (this class's default) | cudnn (cuDNN first, flash as its fallback) | auto
        (torch's own choice)."""
        from torch.nn.attention import SDPBackend

        self.paged_prefill = choice == "paged"
        if self.paged_prefill:
            self.prefill_sdpa_backends = None
            return
        lists = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                 "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                           SDPBackend.MATH],
                 "auto": None}
        if choice not in lists:
            raise ValueError(f"prefill_attention must be flash|cudnn|auto|paged, got {choice!r}")
        self.prefill_sdpa_backends = lists[choice]

    def _sdpa_backends(self):
        """The context that restricts SDPA to prefill_sdpa_backends (entered once per forward)."""
        if not self.prefill_sdpa_backends:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        try:
            return sdpa_kernel(self.prefill_sdpa_backends, set_priority=True)
        except TypeError:  # older torch: no priorities
            return sdpa_kernel(self.prefill_sdpa_backends)

    def _sdpa(self, qh, kh, vh, L: int, seq_len: int, gqa: bool) -> torch.Tensor:
        if L == seq_len:
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(L, seq_len), scale=self.scale,
                                              enable_gqa=gqa)

    # ------------------------------------------------------------------ the backend call
    def plan(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The step's metadata with what every layer's call would repeat built once: the paged prefill kernel's
        tile map (some ten small kernels a layer otherwise, inside every prefill and mixed graph). The step's rows
        are len(slot_mapping) (one slot per query row, -1 for padding), as every caller builds it."""
        if not (self.paged_prefill and meta.num_prefills) or meta.prefill_tile_map is not None:
            return meta
        nd, T = meta.num_decodes, meta.slot_mapping.shape[0]
        tile_map = step_tile_map(T, T - nd, self.num_heads, self.num_kv_heads, meta.query_start_loc[nd:])
        return dataclasses.replace(meta, prefill_tile_map=tile_map)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None, rope: Rope | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] for this step -> [T, H, D] (into `out` when given). With rope, q and k
        are rotated in place first, fused into the KV store."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        self.store(q, k, v, kv_layer, meta.slot_mapping, rope)
        nd = meta.num_decodes
        # one prefill sequence making up the whole batch: SDPA's own output can be returned as it is
        single = out is None and nd == 0 and meta.num_prefills == 1
        if out is None and not single:
            out = torch.empty_like(q)
        if nd:
            self.decode(q[:nd], kv_layer, meta.block_tables, meta.seq_lens, meta.max_seq_len, out[:nd])
        if meta.num_prefills and self.paged_prefill:  # every prefill row in one launch, bounded by T
            out = torch.empty_like(q) if out is None else out
            paged_prefill_attention(q, kv_layer, meta.block_tables[nd:], meta.query_start_loc[nd:], meta.seq_lens[nd:],
                                    self.scale, max_query_len=q.shape[0] - nd, out=out, tile_map=meta.prefill_tile_map,
                                    float8_dot_f16=self.float8_dot_f16)
        elif meta.num_prefills:
            starts = meta.query_start_loc_host or meta.query_start_loc.tolist()
            lens = meta.seq_lens_host or meta.seq_lens.tolist()
            with self._sdpa_backends():
                for i in range(nd, meta.num_seqs):
                    s, e = starts[i], starts[i + 1]
                    if e == s:
                        continue
                    o = self.prefill(q[s:e], k[s:e], v[s:e], kv_layer, meta.block_tables[i], lens[i])
                    o = o[0].transpose(0, 1)
                    if single and s == 0 and e == q.shape[0] and o.is_contiguous():
                        return o
                    if out is None:
                        out = torch.empty_like(q)
                    out[s:e].copy_(o)
        return torch.empty_like(q) if out is None else out

__all__ = ["TritonAttention"]

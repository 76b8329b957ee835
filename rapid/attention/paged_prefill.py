"""Paged prefill attention in Triton: varlen, causal (bottom-right aligned), GQA, read straight from the pool.

What it computes: exactly ReferenceAttention._prefill (rapid/attention/reference.py) for every sequence
of a batch at once. Sequence s owns the query rows q[start[s] : start[s+1]] (start = query_start_loc), the
last q_len = start[s+1] - start[s] positions of a context of seq_lens[s] tokens: query row i sits at
position seq_lens[s] - q_len + i and attends to key positions 0..that position, read from the paged pool
through block_tables[s] (position p: block block_tables[s][p // block_size], offset p % block_size). The
chunk's own keys/values must already be in the pool (TritonAttention.store runs first). Query head h
reads kv head h // (H // KVH).

Kernel: flash-attention-2 style online softmax, fp32 accumulation, scores in the log2 domain (exp2) as
in the decode kernel. One program per (query tile, kv head); a query tile packs TOKENS query tokens x all
GROUP query heads of the kv head into BLOCK_M rows, so every K/V tile is loaded once for the whole GQA
group. Key tiles are BLOCK_N positions; the loop stops at the tile's causal limit, and only the key tiles that
some row of the tile cannot wholly see (its diagonal) pay for the causal mask. Programs start longest first: a
sequence's last query tiles, which see the most keys, are launched first, for every kv head.

Grid (default, flat_grid=True): (num_tiles, KVH), num_tiles = min(cdiv(T_bound, TOKENS) + S,
S * cdiv(max_query_len, TOKENS)), an upper bound of sum_s cdiv(q_len_s, TOKENS) from host bounds only
(T_bound = max_num_tokens >= start[S] - start[0], default T). Which (sequence, first token) a tile id
takes comes from a tile map [num_tiles, 2] int32 built on the device by torch ops (prefill_tile_map:
cumsum of tiles per sequence, searchsorted), whose shapes depend on S and num_tiles only; ids past the
batch's tiles map to sequence -1 and exit. So a mixed batch of many decode rows (q_len 1) and one long
chunk launches about as many programs as it has useful tiles: S=256, T=2303, TOKENS=16 gives 400 per kv
head, where the per-sequence grid (flat_grid=False: (S, cdiv(max_query_len, TOKENS), KVH), tiles past
q_len exit) gives 256 x 128 = 32768.

CUDA-graph safety: the wrapper does no host sync (no .item(), .tolist(), data-dependent shapes or
Python loops over sequences): grid and tile-map shapes are host values, so one graph captured at a bound
serves every batch under it. The key loop bound is read in the kernel from seq_lens. Rows of q covered
by no sequence are not written. Requires seq_lens[s] >= q_len and the bounds to hold (a too small
max_num_tokens or max_query_len silently drops tiles).

Used by TritonAttention when prefill_attention="paged" (the default). On the H200 one layer at 2048
tokens takes 0.43x flash SDPA's time (bench/results/session32, REPORT.md section 3), and the whole-batch graphs
built on it (rapid/compile/full_graph.py, decodes as q_len-1 rows) match transformers' greedy tokens there
(tests/test_gpu_rapid.py). On the CPU it runs through Triton's interpreter (tests/test_paged_prefill.py,
tests/test_triton_backend_interpreted.py). The tile map depends only on the step's metadata, so
TritonAttention.plan builds it once per step (step_tile_map) and every layer's call takes it as `tile_map`.
Launch settings: bench/paged_prefill_sweep.py times them (bench/results/session30/call4, before the unmasked
loop and the launch order: 128-row tiles were 7-11% faster on prompts; not adopted, see REPORT.md section 3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rapid.attention.kv_dtype import dots_in_float16
from rapid.attention.online_softmax import online_softmax_step
from rapid.attention.sizes import next_pow2


@triton.jit
def _paged_prefill_kernel(
    Q, KC, VC, BT, QSL, SEQ_LENS, TILE_MAP, OUT,  # TILE_MAP: [num_tiles, 2] (seq, first token); unused unless FLAT
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    stride_qt, stride_qh,
    stride_cb, stride_co, stride_ch,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FLAT: tl.constexpr,
    DOT_F16: tl.constexpr,
):
    """Program (tile, kv_head): TOKENS query tokens x GROUP heads (BLOCK_M rows) over their causal context."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    if FLAT:  # grid (num_tiles, KVH): the tile's sequence and first token come from the device tile map
        # Longest first: the GPU starts programs in launch order (axis 0 fastest), and a sequence's later tiles
        # see more keys, so launch slot i runs kv head i % KVH of tile num_tiles - 1 - i // KVH.
        num_tiles = tl.num_programs(0)
        slot = tl.program_id(1) * num_tiles + tl.program_id(0)
        kvh = slot % tl.num_programs(1)
        tid = num_tiles - 1 - slot // tl.num_programs(1)
        seq = tl.load(TILE_MAP + 2 * tid)  # -1: past the batch's tiles
        first = tl.load(TILE_MAP + 2 * tid + 1)
    else:  # grid (S, cdiv(max_query_len, TOKENS), KVH)
        seq = tl.program_id(0)
        first = tl.program_id(1) * TOKENS
        kvh = tl.program_id(2)
    live = seq >= 0
    seq = tl.maximum(seq, 0)
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    # first: the tile's first query token, relative to the chunk. Tiles past the batch, past the chunk (and
    # padding rows, q_len 0) do nothing.
    if live & (first < q_len):
        seq_len = tl.load(SEQ_LENS + seq)
        ctx_start = seq_len - q_len  # position of the chunk's first token
        r = tl.arange(0, BLOCK_M)
        tok = first + r // GROUP  # [BLOCK_M] query token of each row
        heads = kvh * GROUP + r % GROUP  # [BLOCK_M] query head of each row
        rmask = (r < TOKENS * GROUP) & (tok < q_len)
        pos = ctx_start + tok  # [BLOCK_M] absolute position: row attends to keys 0..pos
        d = tl.arange(0, D_PAD)
        dmask = d[None, :] < HEAD_DIM
        q_rows = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh  # [BLOCK_M]
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=rmask[:, None] & dmask, other=0.0)  # [BLOCK_M, D_PAD]
        if DOT_F16:  # a float8 pool under bf16 queries: dots in float16 (queries clamped to its range), as decode's
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        head_off = kvh * stride_ch
        # Keys 0..end-1 are all this tile can see; key 0 is visible to every row (pos >= 0, since seq_len >= q_len:
        # a row with pos < 0 would come out NaN), so each row's running max is finite after the first key tile
        # and exp2(m_i - m_new) never sees -inf - -inf. Keys 0..ctx_start + first are visible to every row: the
        # whole key tiles among them run without masks, the rest (the tile's diagonal) with the causal mask.
        end = ctx_start + tl.minimum(first + TOKENS, q_len)
        unmasked_end = (ctx_start + first + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, unmasked_end, BLOCK_N):
            kpos = n0 + offs_n  # [BLOCK_N]
            blk = tl.load(bt_row + kpos // BLOCK_SIZE).to(tl.int64)
            krow = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_co + head_off  # [BLOCK_N]
            k = tl.load(KC + krow[:, None] + d[None, :], mask=dmask, other=0.0).to(q.dtype)  # [BLOCK_N, D_PAD]
            v = tl.load(VC + krow[:, None] + d[None, :], mask=dmask, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
        for n0 in range(unmasked_end, end, BLOCK_N):
            kpos = n0 + offs_n  # [BLOCK_N]
            nmask = kpos < end
            blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            krow = blk * stride_cb + (kpos % BLOCK_SIZE) * stride_co + head_off  # [BLOCK_N]
            kvmask = nmask[:, None] & dmask
            k = tl.load(KC + krow[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)  # [BLOCK_N, D_PAD]
            v = tl.load(VC + krow[:, None] + d[None, :], mask=kvmask, other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            s = tl.where(nmask[None, :] & (kpos[None, :] <= pos[:, None]), s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
        tl.store(OUT + o_rows[:, None] + d[None, :], o.to(OUT.dtype.element_ty), mask=rmask[:, None] & dmask)


def prefill_launch_config(num_seqs: int, max_query_len: int | None, num_heads: int, num_kv_heads: int,
                          block_m: int = 64, *, max_num_tokens: int | None = None,
                          flat_grid: bool = True) -> tuple[tuple[int, ...], int]:
    """(grid, BLOCK_M) of a launch: a function of host bounds only, never of the batch's data.

    BLOCK_M (rows of a query tile) is raised to the GQA group size when smaller, so a tile holds at least
    one query token (x GROUP heads); TOKENS = BLOCK_M // GROUP tokens per tile. Bounds (None: none given):
    max_query_len of any q_len, max_num_tokens of the sum of q_len. flat_grid: (num_tiles, KVH), num_tiles
    the smaller of cdiv(max_num_tokens, TOKENS) + S and S * cdiv(max_query_len, TOKENS) (each bounds
    sum_s cdiv(q_len_s, TOKENS)); else (S, cdiv(max_query_len, TOKENS), KVH). Always at least one tile."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if max_query_len is None and (max_num_tokens is None or not flat_grid):
        raise ValueError("need max_query_len (or, for the flat grid, max_num_tokens)")
    group = num_heads // num_kv_heads
    block_m = max(16, next_pow2(block_m), next_pow2(group))
    tokens = block_m // group
    per_seq = None if max_query_len is None else -(-max(0, int(max_query_len)) // tokens)
    if not flat_grid:
        return (int(num_seqs), max(1, per_seq), num_kv_heads), block_m
    bounds = [int(num_seqs) * per_seq] if per_seq is not None else []
    if max_num_tokens is not None:
        bounds.append(-(-max(0, int(max_num_tokens)) // tokens) + int(num_seqs))
    return (max(1, min(bounds)), num_kv_heads), block_m


def prefill_tile_map(query_start_loc: torch.Tensor, tokens: int, num_tiles: int) -> torch.Tensor:
    """[num_tiles, 2] int32 (sequence, first query token of the tile) for tile ids 0..num_tiles-1, on the
    device of query_start_loc, by torch ops only (no host sync; shapes from S and num_tiles). Sequence s
    owns cdiv(q_len_s, tokens) consecutive ids; ids past the last are (-1, unused)."""
    qsl = query_start_loc.to(torch.int32)
    per_seq = (qsl[1:] - qsl[:-1] + (tokens - 1)) // tokens  # [S] tiles of each sequence
    cum = torch.cumsum(per_seq, 0, dtype=torch.int32)  # [S] inclusive
    t = torch.arange(num_tiles, dtype=torch.int32, device=qsl.device)
    seq = torch.searchsorted(cum, t, right=True, out_int32=True)  # first s with cum[s] > t; S past the end
    first = (t - (cum - per_seq)[seq.clamp(max=per_seq.shape[0] - 1)]) * tokens
    return torch.stack([torch.where(seq < per_seq.shape[0], seq, -1), first], 1)


def step_tile_map(num_rows: int, max_query_len: int, num_heads: int, num_kv_heads: int,
                  query_start_loc: torch.Tensor, block_m: int = 64) -> torch.Tensor:
    """The tile map paged_prefill_attention builds for q of num_rows rows over these sequences (query_start_loc
    [S+1]), given the same max_query_len and block_m and no max_num_tokens: built once so that every layer of a
    step can pass it (`tile_map=`)."""
    grid, bm = prefill_launch_config(query_start_loc.shape[0] - 1, max_query_len, num_heads, num_kv_heads, block_m,
                                     max_num_tokens=num_rows)
    return prefill_tile_map(query_start_loc, bm // (num_heads // num_kv_heads), grid[0])


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D] queries of all prefill chunks, flattened
    kv_layer: torch.Tensor,  # [2, num_blocks, block_size, KVH, D] one layer of the pool (as TritonAttention.decode)
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start_loc: torch.Tensor,  # [S+1] int32: sequence s owns q rows [start[s], start[s+1])
    seq_lens: torch.Tensor,  # [S] int32: context length of sequence s after this chunk
    scale: float,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,  # [T, H, D], a view may be given
    max_num_tokens: int | None = None,
    flat_grid: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    tile_map: torch.Tensor | None = None,  # [num_tiles, 2] from step_tile_map (same rows, sequences, block_m)
    float8_dot_f16: bool = True,  # a float8 pool under bf16 queries: dots in float16 (else in bf16)
) -> torch.Tensor:
    """Causal paged attention of every sequence's chunk over its whole context -> out [T, H, D].

    max_query_len: a host upper bound of start[s+1] - start[s] over the batch (a larger bound only adds
    programs that exit at once; None: T, always a bound). max_num_tokens: a host upper bound of
    start[S] - start[0] (None: T). flat_grid=False: the older per-sequence grid, which launches
    S * cdiv(max_query_len, TOKENS) programs per kv head. Rows of q covered by no sequence are left as
    they are in `out` (uninitialised when out is None). To run a mixed batch's prefill part, pass the
    metadata tensors sliced from num_decodes on (query_start_loc[nd:] keeps absolute row offsets); decode
    rows (q_len 1) are valid input too. No host sync: safe to capture in a CUDA graph. tile_map: the flat
    grid's map, built once per step by step_tile_map (else built here, about ten small kernels a call).
    """
    T, H, D = q.shape
    kc, vc = kv_layer[0], kv_layer[1]  # [NB, BS, KVH, D]
    KVH = kc.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert out.stride(-1) == 1 and kc.stride(-1) == 1 and kc.stride() == vc.stride() and block_tables.stride(-1) == 1
    assert kc.shape[3] == D and out.shape == q.shape
    S = block_tables.shape[0]
    if S == 0 or T == 0:
        return out
    grid, bm = prefill_launch_config(S, T if max_query_len is None else max_query_len, H, KVH, block_m,
                                     max_num_tokens=T if max_num_tokens is None else max_num_tokens,
                                     flat_grid=flat_grid)
    if not flat_grid:
        tile_map = query_start_loc
    elif tile_map is None:
        tile_map = prefill_tile_map(query_start_loc, bm // (H // KVH), grid[0])
    elif tile_map.shape[0] != grid[0]:
        raise ValueError(f"tile_map has {tile_map.shape[0]} tiles, this launch needs {grid[0]} "
                         f"({T} rows, {S} sequences, BLOCK_M {bm}): build it with step_tile_map for the same batch")
    _paged_prefill_kernel[grid](
        q, kc, vc, block_tables, query_start_loc, seq_lens, tile_map, out,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // KVH, HEAD_DIM=D, D_PAD=max(16, next_pow2(D)), BLOCK_SIZE=kc.shape[1],
        BLOCK_M=bm, BLOCK_N=max(16, next_pow2(block_n)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32: exact, not tf32
        FLAT=flat_grid, DOT_F16=float8_dot_f16 and dots_in_float16(kc.dtype, q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = ["paged_prefill_attention", "prefill_launch_config", "prefill_tile_map", "step_tile_map"]

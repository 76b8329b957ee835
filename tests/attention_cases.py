"""Random paged-attention cases shared by the GPU attention tests and the CPU (Triton interpreter) backend test."""

from __future__ import annotations

import random

import torch

from rapid.attention.metadata import AttentionMetadata


def make_case(seqs, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.bfloat16, device=None,
              seed=0, max_seq_len=None, pad_rows=0):
    """seqs: [(context length after this step, query tokens)], decodes (q=1) first.

    Returns q, k, v, pool (one layer, random), meta. `pad_rows` extra decode-like rows with slot -1
    and context length 0 are inserted after the decodes (as CUDA-graph padding would be).
    """
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = sum(-(-c // block_size) for c, _ in seqs)
    num_blocks = need + 7
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, starts, lens = [], [], [0], []
    nd = 0
    for i, (ctx, ql) in enumerate(seqs):
        assert 1 <= ql <= ctx
        nb = -(-ctx // block_size)
        blocks, perm = perm[:nb], perm[nb:]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx - ql, ctx)]
        starts.append(starts[-1] + ql)
        lens.append(ctx)
        if ql == 1 and nd == i:
            nd += 1
    if pad_rows:
        assert nd == len(seqs), "padding rows only in decode-only batches"
        for _ in range(pad_rows):
            tables.append([rng.randrange(num_blocks)])
            slots.append(-1)
            starts.append(starts[-1] + 1)
            lens.append(0)
        nd += pad_rows
    width = max(len(t) for t in tables) + rng.randrange(3)
    tables = [t + [0] * (width - len(t)) for t in tables]
    T = starts[-1]
    q = torch.randn(T, num_heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g).to(device, dtype)
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(device, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        num_decodes=nd,
        max_seq_len=max_seq_len or max(lens),
        query_start_loc_host=starts,
        seq_lens_host=lens,
    )
    return q, k, v, pool, meta

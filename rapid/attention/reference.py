"""Reference paged attention in plain torch: correct on CPU and GPU, the oracle for fast backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rapid.attention.kv_dtype import as_bytes, to_kv
from rapid.attention.metadata import AttentionMetadata
from rapid.attention.rope import Rope, apply_rope_


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's keys/values into the pool. k, v: [T, KVH, D]; kv_layer: [2, NB, BS, KVH, D]."""
    flat = kv_layer.flatten(1, 2)  # [2, NB*BS, KVH, D]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    as_bytes(flat[0]).index_copy_(0, slot_mapping, as_bytes(to_kv(k, flat.dtype)))  # float8: copied as bytes
    as_bytes(flat[1]).index_copy_(0, slot_mapping, as_bytes(to_kv(v, flat.dtype)))


def gather_context(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence's first seq_len positions: two [seq_len, KVH, D] tensors."""
    block_size = kv_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[:, block_table[:num_blocks].long()]  # [2, nb, BS, KVH, D]
    blocks = blocks.flatten(1, 2)[:, :seq_len]
    return blocks[0], blocks[1]


class ReferenceAttention:
    """Paged attention with torch ops; decode rows are batched, prefill chunks loop per sequence."""

    name = "reference"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def plan(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Nothing is shared between layers here: the step's metadata as it is."""
        return meta

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] for this step -> [T, H, D]; with rope, q and k rotated in place first."""
        if rope is not None:
            apply_rope_(q, k, rope)
        store_kv(k, v, kv_layer, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_layer, meta.block_tables[:nd], meta.seq_lens[:nd], meta.max_seq_len)
        if meta.num_prefills:
            starts = meta.query_start_loc_host or meta.query_start_loc.tolist()
            lens = meta.seq_lens_host or meta.seq_lens.tolist()
            for i in range(nd, meta.num_seqs):
                s, e = starts[i], starts[i + 1]
                out[s:e] = self._prefill(q[s:e], kv_layer, meta.block_tables[i], lens[i])
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [B, H, L, D], keys/values: [B, KVH, S, D], mask: [B, 1, L, S] bool (True = attend)
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1), values.float()).to(q.dtype)

    def _decode(self, q, kv_layer, block_tables, seq_lens, max_seq_len) -> torch.Tensor:
        # q: [B, H, D]; gather every sequence's context padded to max_seq_len.
        bs = kv_layer.shape[2]
        nb = (max_seq_len + bs - 1) // bs
        blocks = kv_layer[:, block_tables[:, :nb].long()]  # [2, B, nb, BS, KVH, D]
        ctx = blocks.flatten(2, 3)  # [2, B, nb*BS, KVH, D]
        keys, values = ctx[0].transpose(1, 2), ctx[1].transpose(1, 2)  # [B, KVH, S, D]
        pos = torch.arange(ctx.shape[2], device=q.device)
        mask = (pos[None, :] < seq_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, S]
        return self._attend(q[:, :, None, :], keys, values, mask)[:, :, 0, :]

    def _prefill(self, q, kv_layer, block_table, seq_len: int) -> torch.Tensor:
        # q: [L, H, D], the last L positions of a context of seq_len tokens (earlier chunks and cached
        # prefix blocks are already in the pool).
        L = q.shape[0]
        keys, values = gather_context(kv_layer, block_table, seq_len)  # [S, KVH, D]
        q_pos = torch.arange(seq_len - L, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, L, S]
        out = self._attend(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], mask)
        return out[0].transpose(0, 1)

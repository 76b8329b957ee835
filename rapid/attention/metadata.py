"""AttentionMetadata: where each token of a flattened batch sits in the paged KV cache.

One forward call serves many sequences at once: the decode steps first (one query token each),
then the prefill chunks. All tokens are flattened into one dimension T.

KV pool layout (one tensor for the whole model, so one shared-memory / IPC handle covers it):
    kv_pool[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (2 = key, value)
A token at position p of a sequence lives in block block_table[p // block_size] at offset
p % block_size; its flat slot is block_id * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapid.attention.kv_dtype import is_float8


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64 flat slot per token; -1 = padding (not written)
    query_start_loc: torch.Tensor  # [S+1] int32, query tokens of sequence i are [start[i], start[i+1])
    seq_lens: torch.Tensor  # [S] int32, context length of sequence i after this step (cached + new)
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with 0
    num_decodes: int  # sequences 0..num_decodes-1 have exactly one query token
    max_seq_len: int  # >= max(seq_lens) (graph runners: max_model_len), a host int: kernels need no device sync
    # Host copies for the per-sequence prefill path (avoids device->host syncs).
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    # Set by the backend's plan() once per step: work every layer's attention call would otherwise repeat.
    prefill_tile_map: torch.Tensor | None = None  # [num_tiles, 2] int32, the paged prefill kernel's (seq, token)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def kv_pool_shape(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)


def allocate_kv_pool(model_cfg, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """A zeroed pool [L, 2, num_blocks, block_size, KVH, D] for a model config (unwritten slots stay finite)."""
    shape = kv_pool_shape(model_cfg.num_layers, num_blocks, block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
    if is_float8(dtype):  # zero bytes are 0.0 (and need no float8 fill kernel)
        return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def prefill_lens(num_tokens: int, max_model_len: int) -> list[int]:
    """A prefill batch of num_tokens as sequences of at most max_model_len tokens (no chunk is longer)."""
    full, rest = divmod(num_tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def write_nothing_metadata(lens: list[int], num_decodes: int, max_seq_len: int, block_size: int,
                           device: torch.device) -> AttentionMetadata:
    """Sequences of `lens` new tokens from position 0 that write no KV (every slot -1) and whose block
    tables are all 0 (reads hit block 0): for warm-up and profiling steps."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    width = -(-max_seq_len // block_size)
    return AttentionMetadata(
        slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(lens), width), dtype=torch.int32, device=device),
        num_decodes=num_decodes, max_seq_len=max_seq_len, query_start_loc_host=starts, seq_lens_host=list(lens),
    )

"""ModelRunner: turns a list of SeqWork into one forward pass over the paged KV pool, then samples.

It owns no scheduling state. The weights and the KV pool are given to it (so two runners in two
processes can share one copy) or loaded/allocated here.
"""

from __future__ import annotations

import logging

import torch

from rapid.attention.metadata import AttentionMetadata
from rapid.model.llama import LlamaModel
from rapid.protocol.worker import SampledToken, SeqWork
from rapid.worker.sampler import SamplingBatch, sample

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_pool: torch.Tensor, block_size: int, seed: int = 0,
                 graph_runners=(), eos_token_ids: tuple[int, ...] = ()):
        self.model = model
        self.kv_pool = kv_pool  # [L, 2, NB, BS, KVH, D]
        self.block_size = block_size
        self.device = kv_pool.device
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.graph_runners = list(graph_runners)  # CUDA-graph runners (rapid.compile), tried in order
        self.eos_token_ids = eos_token_ids  # masked while a request is below min_tokens

    def build_inputs(self, work: list[SeqWork]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the batch: input_ids [T], positions [T], metadata, and the rows that produce logits."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        num_decodes = 0
        for w in work:
            n = len(w.token_ids)
            if n == 1 and len(starts) - 1 == num_decodes:
                num_decodes += 1
            input_ids.extend(w.token_ids)
            pos = range(w.start_pos, w.start_pos + n)
            positions.extend(pos)
            slots.extend(w.block_ids[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(w.start_pos + n)
            if w.sample:
                logit_rows.append(starts[-1] - 1)
        max_blocks = max(len(w.block_ids) for w in work)
        tables = [w.block_ids + [0] * (max_blocks - len(w.block_ids)) for w in work]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.tensor(tables, dtype=torch.int32).to(dev, non_blocking=True),
            num_decodes=num_decodes,
            max_seq_len=max(seq_lens),
            query_start_loc_host=starts,
            seq_lens_host=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos_t, meta, logit_rows

    @torch.inference_mode()
    def forward_logits(self, work: list[SeqWork]) -> torch.Tensor:
        """Run the forward pass; return float32 logits [S_sample, vocab] for the sampling rows."""
        ids, positions, meta, rows = self.build_inputs(work)
        graphs = next((g for g in self.graph_runners if g.can_run(meta, ids.shape[0])), None)
        if graphs is not None:
            hidden = graphs.run(ids, positions, meta)
        else:
            hidden = self.model(ids, positions, self.kv_pool, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]) if rows else None
        return logits

    @torch.inference_mode()
    def execute(self, work: list[SeqWork]) -> list[SampledToken]:
        """Forward + sample: one SampledToken per SeqWork with sample=True, in order."""
        logits = self.forward_logits(work)
        sampling = [w for w in work if w.sample]
        if not sampling:
            return []
        batch = SamplingBatch.build(
            params=[w.params for w in sampling],
            output_token_ids=[w.output_token_ids for w in sampling],
            prompt_token_ids=[w.prompt_token_ids for w in sampling],
            step_indices=[w.step_index for w in sampling],
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
        )
        out = sample(logits, batch, self.generator)
        return [
            SampledToken(w.request_id, tok, lp, top)
            for w, tok, lp, top in zip(sampling, out.token_ids, out.sampled_logprob, out.logprobs)
        ]

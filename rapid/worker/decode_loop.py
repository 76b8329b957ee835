"""The decode executor: the requests resident on it, stepped by itself, with prefill chunks placed inline.

The same class runs inside the decode worker process (modes 'rapid' and 'disagg') and inside the
user's process (mode 'hybrid', where every prefill batch is placed inline: hybrid batching). The
engine core talks to it only through messages (rapid/protocol/worker.py): StartDecode, GrantBlocks,
StopDecode and PrefillBatch in; DecodeStep, PrefillDone and Dropped out.
"""

from __future__ import annotations

import time

import torch

from rapid.config import EngineConfig
from rapid.core.request import Request
from rapid.core.scheduler import seq_work
from rapid.protocol.worker import (
    DecodeStep, Dropped, GrantBlocks, PrefillBatch, PrefillDone, SampledToken, StartDecode, StopDecode,
)
from rapid.worker.model_runner import ModelRunner


class DecodeLoop:
    """Steps every resident request that has a block for its next token; one inline prefill batch at a time."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, eos_token_ids: tuple[int, ...]):
        self.runner = runner
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.eos_token_ids = eos_token_ids
        self.running: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}  # request id -> block table
        self.pending_handoff: dict[str, float] = {}  # request -> prefill end time
        self.inline: PrefillBatch | None = None  # prefill placed in this executor's next step
        self.last_step_end: float | None = None
        self.peer_kv: torch.Tensor | None = None  # disagg: the prefill worker's KV pool (hand-off source)
        self.transferred: list[str] = []  # disagg: copies done since the last report

    def handle(self, msg) -> Dropped | None:
        """Apply one message from the core; a StopDecode is answered with Dropped."""
        if isinstance(msg, StartDecode):
            req = Request(msg.request_id, msg.prompt_token_ids, msg.params, self.eos_token_ids,
                          max_model_len=self.max_model_len, output_token_ids=list(msg.output_token_ids))
            req.num_computed_tokens = req.num_tokens - 1
            if msg.src_block_ids:
                self._copy_from_peer(msg.src_block_ids, msg.block_ids)
                self.transferred.append(req.request_id)
            self.running[req.request_id] = req
            self.tables[req.request_id] = list(msg.block_ids)
            self.pending_handoff[req.request_id] = msg.prefill_end
        elif isinstance(msg, GrantBlocks):
            if msg.request_id in self.tables:
                self.tables[msg.request_id].extend(msg.block_ids)
        elif isinstance(msg, StopDecode):
            for rid in msg.request_ids:
                self.running.pop(rid, None)
                self.tables.pop(rid, None)
                self.pending_handoff.pop(rid, None)
            return Dropped(list(msg.request_ids))
        elif isinstance(msg, PrefillBatch):
            if self.inline is not None:
                raise RuntimeError(f"prefill batch {msg.batch_id} placed while batch {self.inline.batch_id} runs")
            self.inline = msg
        return None

    def _copy_from_peer(self, src: list[int], dst: list[int]) -> None:
        """disagg: move a request's KV from the prefill worker's pool into this pool."""
        kv = self.runner.kv_pool  # [L, 2, NB, BS, KVH, D]
        src_t = torch.tensor(src, device=self.peer_kv.device)
        dst_t = torch.tensor(dst[: len(src)], device=kv.device)
        kv.index_copy_(2, dst_t, self.peer_kv.index_select(2, src_t).to(kv.device))

    def runnable(self) -> list[Request]:
        """Resident requests whose blocks hold their next token (at most max_num_seqs)."""
        bs = self.block_size
        ready = [r for r in self.running.values() if len(self.tables[r.request_id]) * bs >= r.num_tokens]
        return ready[: self.max_num_seqs]

    def has_work(self) -> bool:
        return self.inline is not None or bool(self.runnable())

    def step(self) -> list:
        """One forward pass: the runnable decodes first, then the inline prefill chunks.
        Returns [DecodeStep] and, with prefill chunks, [PrefillDone] too (the same interval)."""
        batch = self.runnable()
        prefill, self.inline = self.inline, None
        t0 = time.time()
        idle = 0.0 if self.last_step_end is None else t0 - self.last_step_end
        work = [seq_work(r, 1, self.tables[r.request_id]) for r in batch]
        if prefill is not None:
            work += prefill.work
        sampled: list[SampledToken] = self.runner.execute(work)
        t1 = time.time()
        decoded, first_tokens = sampled[: len(batch)], sampled[len(batch):]
        finished, handoffs = [], []
        for req, tok in zip(batch, decoded):
            if req.request_id in self.pending_handoff:
                handoffs.append(t0 - self.pending_handoff.pop(req.request_id))
            if req.append_token(tok.token_id, t1) is not None:
                finished.append(req.request_id)
                del self.running[req.request_id]
                del self.tables[req.request_id]
        self.last_step_end = t1
        out: list = [DecodeStep(decoded, finished, t0, t1, idle_gap_s=idle, handoffs=handoffs)] if batch else []
        if prefill is not None:
            out.append(PrefillDone(prefill.batch_id, first_tokens, t0, t1,
                                   num_tokens=sum(len(w.token_ids) for w in prefill.work)))
        return out

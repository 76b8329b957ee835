"""The decode executor: the requests resident on it, stepped by itself, with prefill chunks placed inline.

The same class runs inside the decode worker process (modes 'rapid' and 'disagg') and inside the
user's process (mode 'hybrid', where every prefill batch is placed inline: hybrid batching; with engine_process, in
the engine-core process). The
engine core talks to it only through messages (rapid/protocol/worker.py): StartDecode, GrantBlocks,
StopDecode and PrefillBatch in; DecodeStep, PrefillDone and Dropped out.

With async scheduling the loop runs one step ahead: it enqueues step N+1 (whose decode rows take their
input token from step N's samples, still on the device) before it reads step N back, so the host's
work (reading back, finishing, the core's scheduling and output processing) overlaps the device's.
Two rules keep that safe: a row of step N+1 whose request ended at step N is discarded, and a request
is reported finished or Dropped (its blocks free for reuse) only once no enqueued step can still
write its KV.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from rapid.attention.kv_dtype import as_bytes
from rapid.config import EngineConfig
from rapid.core.request import Request, seq_work
from rapid.protocol.worker import (
    DecodeStep, DeviceTime, Dropped, GrantBlocks, PrefillBatch, PrefillDone, SampledToken, SeqWork, StartDecode,
    StopDecode,
)
from rapid.worker.grammar import GrammarBook
from rapid.worker.model_runner import Launched, ModelRunner


@dataclass
class Step:
    """One forward pass enqueued and not yet read back."""

    launched: Launched
    batch: list[Request]  # its decode rows, in order (the first len(batch) sampling rows)
    prefills: list[PrefillBatch]  # inline prefill chunks after them, batch by batch
    t0: float
    idle: float
    ids: set[str] = field(default_factory=set)  # request ids of the decode rows
    after_idle: bool = False  # the first step after the executor had nothing resident (DecodeStep.after_idle)
    after_pause: bool = False  # launched after a spell with nothing to run (note_no_work), residents waiting or not


def _needs_host_tokens(params) -> bool:
    """Rows whose sampling reads the previous tokens on the host: they cannot run a step ahead."""
    return (params.structured_outputs is not None or bool(params.bad_words_token_ids)
            or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0)


class DecodeLoop:
    """Steps every resident request that has a block for its next token, with the inline prefill batches queued that
    fit the step (the core may queue the next while one computes)."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, eos_token_ids: tuple[int, ...], *,
                 kv_read_elsewhere: bool = False):
        self.runner = runner
        # a worker whose KV other processes read (rapid's decode worker: a prefill worker reads its blocks for a
        # prefix-cache hit or a prompt's next chunk) reports an inline prefill batch only once that step's writes
        # are complete
        self.kv_read_elsewhere = kv_read_elsewhere
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_step_tokens = config.scheduler.max_num_batched_tokens  # the largest step the graphs hold
        self.eos_token_ids = eos_token_ids
        self.running: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}  # request id -> block table
        self.pending_handoff: dict[str, float] = {}  # request -> prefill end time
        self.inline: deque[PrefillBatch] = deque()  # prefill placed in this executor's next steps (_take_inline)
        self.last_step_end: float | None = None
        self.ran_dry = True  # nothing resident since the last step launched (start included)
        self.peer_kv: torch.Tensor | None = None  # disagg: the prefill worker's KV pool (hand-off source)
        self.transferred: list[str] = []  # disagg: copies done since the last report
        self.grammars = runner.grammars = GrammarBook(config.tokenizer, eos_token_ids)  # structured outputs
        self.async_scheduling = config.async_scheduling
        self.pending: Step | None = None  # enqueued, not read back (async scheduling)
        self.deferred_drops: list[str] = []  # stopped while a pending step still writes their KV

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
            in_flight = self.pending.ids if self.pending is not None else set()
            self.deferred_drops += [rid for rid in msg.request_ids if rid in in_flight]
            now = [rid for rid in msg.request_ids if rid not in in_flight]
            return Dropped(now) if now else None
        elif isinstance(msg, PrefillBatch):
            self.inline.append(msg)
        return None

    def _copy_from_peer(self, src: list[int], dst: list[int]) -> None:
        """disagg: move a request's KV from the prefill worker's pool into this pool."""
        kv = self.runner.kv_pool  # [L, 2, NB, BS, KVH, D]
        src_t = torch.tensor(src, device=self.peer_kv.device)
        dst_t = torch.tensor(dst[: len(src)], device=kv.device)
        as_bytes(kv).index_copy_(2, dst_t, as_bytes(self.peer_kv).index_select(2, src_t).to(kv.device))  # float8 too

    def runnable(self) -> list[Request]:
        """Resident requests whose blocks hold their next token (at most max_num_seqs)."""
        bs = self.block_size
        ready = [r for r in self.running.values() if len(self.tables[r.request_id]) * bs >= r.num_tokens]
        return ready[: self.max_num_seqs]

    def has_work(self) -> bool:
        return bool(self.inline) or self.pending is not None or bool(self.runnable())

    def note_no_work(self) -> None:
        """The executor has nothing to run now: the host's gap before the next step is not overhead, and when
        nothing is resident either (not just waiting for blocks), neither is the device's wait (ran_dry)."""
        self.last_step_end = None
        if not self.running and not self.inline:
            self.ran_dry = True

    def step(self) -> list:
        """Enqueue the next forward pass (the runnable decodes first, then the inline prefill chunks) and read
        back the previous one (async scheduling) or this one. Returns what was read back: DecodeStep,
        PrefillDone for inline chunks (the same interval), Dropped for stops that waited for the device."""
        out: list = []
        prev = self.pending
        if prev is not None and not self._can_run_ahead():
            self.pending = None
            out += self._finish(prev)  # the next step needs the host to know these tokens first
            prev = None
        self.pending = self._launch(prev)  # its rows of `prev`'s requests take their input from `prev`'s samples
        if prev is not None:
            out += self._finish(prev)
        if self.pending is not None and not (self.async_scheduling and self.pending.batch):
            step, self.pending = self.pending, None
            out += self._finish(step)  # nothing to overlap with (or async scheduling off): read it back now
        in_flight = self.pending.ids if self.pending is not None else set()
        ready = [rid for rid in self.deferred_drops if rid not in in_flight]
        if ready:
            out.append(Dropped(ready))
            self.deferred_drops = [rid for rid in self.deferred_drops if rid in in_flight]
        return out

    def _can_run_ahead(self) -> bool:
        return self.async_scheduling and not any(_needs_host_tokens(r.params) for r in self.running.values())

    def _ahead_work(self, req: Request) -> SeqWork:
        """A decode row one step ahead: its input is the token the pending step samples (a placeholder here)."""
        n = req.num_tokens  # the pending step samples token n
        return SeqWork(req.request_id, [0], n, list(self.tables[req.request_id]), True, req.params,
                       len(req.output_token_ids) + 1, req.prompt_token_ids, req.output_token_ids)

    def _take_inline(self) -> list[PrefillBatch]:
        """The inline batches of the next step: the first queued, then each next one while the step stays inside
        both batches' budgets with the resident decodes, and no request of it is in a batch taken (a prompt's next
        chunk runs in the step after its last). In a worker process the core sends a batch as prompts arrive, so
        several can queue within one step; one a step held each a step behind the one before (on the H200 at 44
        req/s rapid's TTFT p50 ran 13 ms over hybrid's for prompts that arrived within 10 ms of another: session
        23)."""
        if not self.inline:
            return []
        taken = [self.inline.popleft()]
        ids = {w.request_id for w in taken[0].work}
        tokens = taken[0].num_tokens
        rows = min(len(self.running), self.max_num_seqs)
        while self.inline:
            nxt = self.inline[0]
            budget = min(b.max_step_tokens for b in (*taken, nxt))
            more = nxt.num_tokens
            if not budget or tokens + more + rows > budget or any(w.request_id in ids for w in nxt.work):
                break
            taken.append(self.inline.popleft())
            ids.update(w.request_id for w in nxt.work)
            tokens += more
        return taken

    def _launch(self, pending: Step | None) -> Step | None:
        prefills = self._take_inline()
        # the core budgets a mixed step's chunk against the decodes it knew of; requests handed off since (from the
        # prefill worker) wait a step rather than overflow the largest graph
        max_rows = min(self.max_num_seqs, self.max_step_tokens - sum(b.num_tokens for b in prefills))
        ahead_ids = pending.ids if pending is not None else set()
        bs = self.block_size
        batch: list[Request] = []
        work: list[SeqWork] = []
        dst, src = [], []
        src_row = {r.request_id: i for i, r in enumerate(pending.batch)} if pending is not None else {}
        for req in self.running.values():
            if len(batch) >= max_rows:
                break
            rid, table = req.request_id, self.tables[req.request_id]
            if rid in ahead_ids:
                if req.reaches_length(extra_tokens=1) or len(table) * bs < req.num_tokens + 1:
                    continue  # it ends with the pending step, or has no block for one more token yet
                dst.append(len(work))
                src.append(src_row[rid])
                work.append(self._ahead_work(req))
            elif len(table) * bs >= req.num_tokens:
                work.append(seq_work(req, 1, table))
            else:
                continue
            batch.append(req)
        for b in prefills:
            work += b.work
        if not work:
            return None
        t0 = time.time()
        idle = 0.0 if self.last_step_end is None else max(0.0, t0 - self.last_step_end)
        inputs_from = (pending.launched, dst, src) if dst else None
        launched = self.runner.launch(work, inputs_from)
        after_idle, self.ran_dry = self.ran_dry and pending is None, False
        return Step(launched, batch, prefills, t0, idle, {r.request_id for r in batch}, after_idle,
                    after_pause=self.last_step_end is None)

    def _finish(self, step: Step) -> list:
        """Read a step back: append each decode row's token, end the requests the rules end."""
        sampled: list[SampledToken] = self.runner.collect(step.launched)
        if step.prefills and self.kv_read_elsewhere:
            # this step only: a stream synchronize would also wait for the step enqueued after it, and the host
            # would then launch the next one late (session 19: 0.65 s of a 30 s run at 48 req/s)
            self.runner.wait(step.launched)
        t1 = time.time()
        # the step's interval: launched ahead (async), it could not start before the step in front of it ended, so
        # it starts at that one's read-back, last_step_end (from its launch, the interval held most of the step
        # before: a mixed step behind a mixed step read as both, and the placement learned twice a prompt token's
        # cost). After a spell without work (last_step_end None) the step was launched after that read-back.
        t_start = step.t0 if self.last_step_end is None else max(step.t0, self.last_step_end)
        decoded, first_tokens = sampled[: len(step.batch)], sampled[len(step.batch):]
        still_ahead = self.pending.ids if self.pending is not None and self.pending is not step else set()
        kept, finished, handoffs = [], [], []
        for req, tok in zip(step.batch, decoded):
            rid = req.request_id
            if self.running.get(rid) is not req:
                continue  # ended at the step before, or stopped by the core meanwhile: not its token
            if rid in self.pending_handoff:
                handoffs.append(step.t0 - self.pending_handoff.pop(rid))
            kept.append(tok)
            if req.append_token(tok.token_id, t1) is not None:
                del self.running[rid]
                del self.tables[rid]
                if rid not in still_ahead:  # a step in flight still writes its KV: the core stops it instead
                    finished.append(rid)
        self.last_step_end = t1
        self.grammars.retain(self.running)  # matchers of finished, dropped and prefill-only rows go
        times = self.runner.device_time(step.launched)
        kind = ("mixed" if step.prefills else "decode") if step.batch else "inline"
        device = DeviceTime(kind, *times, eager=step.launched.eager) if times is not None else None  # one message
        if device is not None:
            # the device's own interval (its events): the step and the stream's wait for the host before it. A
            # read-back that lags a step's end would shorten the next step's host interval. (The stream's wait
            # after a pause, requests waiting for blocks included, is no part of the step.)
            t_start = t1 - device.busy_s - (0.0 if step.after_pause else device.idle_s)
        out: list = [DecodeStep(kept, finished, t_start, t1, idle_gap_s=step.idle, handoffs=handoffs,
                                device=device, after_idle=step.after_idle)] if step.batch else []
        out += self._prefills_done(step, first_tokens, t_start, t1, None if step.batch else device)
        return out

    @staticmethod
    def _prefills_done(step: Step, first_tokens: list[SampledToken], t_start: float, t1: float,
                       device: DeviceTime | None) -> list[PrefillDone]:
        """One PrefillDone per inline batch of the step, in order, with the step's interval. When the step ran
        several, the first carries the step's prompt tokens and device time for the placement and stats, the rest
        none (step_tokens 0), so that the step is learned once."""
        tokens = [b.num_tokens for b in step.prefills]
        merged = len(step.prefills) > 1
        out = []
        for i, (b, n) in enumerate(zip(step.prefills, tokens)):
            ids = {w.request_id for w in b.work}
            out.append(PrefillDone(b.batch_id, [t for t in first_tokens if t.request_id in ids], t_start, t1,
                                   num_tokens=n, device=device if i == 0 else None,
                                   step_tokens=(sum(tokens) if i == 0 else 0) if merged else None))
        return out

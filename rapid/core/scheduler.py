"""The one scheduler of every mode: admission, prefill batches, KV blocks for decoding, preemption, finishing.

Contract (in the spirit of vLLM v1's SchedulerInterface):

    add_request(req)            admit; ValueError if it can never fit
    schedule() -> SchedulerOutput
                                the messages to send, per lane: a prefill batch (when its lane is free),
                                hand-offs to the decode executor, block grants, stops
    update_from_output(msg)     apply a worker's result (PrefillDone, DecodeStep, Dropped, Transferred);
                                returns the requests with new output
    finish(req, reason)         end a request (abort, stop string) wherever it is

Decoding requests are resident on the decode executor, which steps them by itself; the scheduler keeps each one
`decode_lookahead_blocks` blocks ahead. Where prefill runs (inside the decode executor's steps = hybrid batching, or
on the prefill worker) is asked of the placement policy before each batch (rapid/core/placement.py). A block is
reused only after the executor that last touched it said so. Plain Python: no torch.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from rapid.config import SchedulerConfig
from rapid.core.admission import GrowthReserve, fits_hand_off
from rapid.core.block_manager import BlockManager
from rapid.core.budget import check_token_budget
from rapid.core.in_flight import InFlight, InFlightBatches
from rapid.core.placement import DECODE, PREFILL, Load, Placement, PlacementLog, StaticPlacement, ewma
from rapid.core.request import Request, RequestStatus, check_fits, lane_kept_for_prompt_logprobs, seq_work
from rapid.protocol.worker import (
    DecodeStep, Dropped, GrantBlocks, PrefillBatch, PrefillDone, SampledToken, StartDecode, StopDecode, Transferred,
)

S = RequestStatus


@dataclass
class SchedulerOutput:
    messages: list[tuple[str, object]] = field(default_factory=list)  # (lane, message), in send order

    @property
    def prefill_batch(self) -> PrefillBatch | None:
        return next((m for _, m in self.messages if isinstance(m, PrefillBatch)), None)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, *, decode_blocks: BlockManager | None = None,
                 lookahead_blocks: int = 2, placement=None,
                 on_token: Callable[[Request, SampledToken], str | None] | None = None):
        """`decode_blocks`: disagg's decode pool (KV copied at hand-off), else `blocks` serves both.
        `on_token(req, tok)`: the output processor; returns a matched stop string, or None."""
        self.config = config
        self.token_budget = config.max_num_batched_tokens
        self.blocks = blocks
        self.decode_blocks = decode_blocks or blocks
        self.separate_pools = decode_blocks is not None
        # admission keeps room for the running requests' growth (one shared pool only: disagg's fills at hand-off)
        self.reserve = (GrowthReserve(config.admission_reserve, blocks, config.max_model_len)
                        if config.admission_reserve > 0 and not self.separate_pools else None)
        self.lookahead_tokens = lookahead_blocks * blocks.block_size
        self.placement = placement or StaticPlacement(DECODE)
        self.placement_log = PlacementLog(self.placement.name)
        self.decode_step_ms: float | None = None  # EWMA of the decode executor's step period
        self.on_token = on_token or (lambda req, tok: None)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # PREFILLING and DECODING, in admission order
        self.in_flight = InFlightBatches()  # per lane, the prefill batches sent and not yet answered
        self.num_preempting = 0  # decoding requests preempted, waiting for the executor's Dropped
        self.transfers: dict[str, list[int]] = {}  # disagg: prefill-pool blocks held until the copy is done
        self.outbox: list[tuple[str, object]] = []
        self.batch_ids = itertools.count()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queries
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_decoding(self) -> int:
        return sum(1 for r in self.running if r.status == S.DECODING)

    @property
    def pools(self) -> list[BlockManager]:
        """Every KV pool the scheduler accounts for (two in disagg)."""
        return [self.blocks, self.decode_blocks] if self.separate_pools else [self.blocks]

    @property
    def num_free_blocks(self) -> int:
        return sum(p.num_free_blocks for p in self.pools)

    @property
    def num_blocks(self) -> int:
        """Blocks in the smallest pool: what one request can use at most."""
        return min(self.blocks.num_blocks, self.decode_blocks.num_blocks)

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        """Prefill tokens per batch (hybrid: per step, decodes included) at run time, up to the configured limit."""
        check_token_budget(max_num_batched_tokens, self.config.max_num_batched_tokens)
        self.token_budget = max_num_batched_tokens

    # ------------------------------------------------------------------ requests in, requests out
    def add_request(self, req: Request) -> None:
        check_fits(f"request {req.request_id}", len(req.prompt_token_ids), req.params.max_tokens,
                   self.config.max_model_len, self.num_blocks, self.blocks.block_size)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        req.max_model_len = self.config.max_model_len
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, reason: str, worker_finished: bool = False) -> None:
        """End a request for the user now; its blocks are freed once no executor can touch them."""
        if req.status.is_done:
            return
        req.finish_reason = reason
        if reason in ("stop", "length"):  # a completed output (not an abort): the lengths the policy plans with
            self.placement.observe_finished(len(req.output_token_ids))
        if req.status == S.DECODING and not worker_finished:
            self.running.remove(req)
            req.status = S.STOPPING
            self.outbox.append((DECODE, StopDecode([req.request_id])))
        elif req.status == S.PREEMPTED or req.request_id in self.in_flight:
            if req in self.running:
                self.running.remove(req)
            if req.status == S.PREEMPTED:
                self.num_preempting -= 1
            req.status = S.STOPPING  # freed on Dropped / when its prefill batch comes back
        else:
            self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req.status == S.WAITING:
            self.waiting.remove(req)
        self._free_everywhere(req)
        req.status = S.FINISHED
        del self.requests[req.request_id]

    def _free_everywhere(self, req: Request) -> None:
        """Drop the request's table in every pool (in disagg it may hold one in either)."""
        for pool in self.pools:
            pool.free(req.request_id)
        if self.reserve:
            self.reserve.forget(req.request_id)

    def _tokens_to_send(self, req: Request) -> int:
        """Tokens whose KV is still to compute and not yet in a batch in flight."""
        return req.num_tokens - req.num_computed_tokens - self.in_flight.tokens_ahead(req.request_id)

    def _has_chunk_for(self, req: Request, lane: str) -> bool:
        """A prefilling request has prompt tokens that a batch for `lane` may take now (beyond those in flight)."""
        left = self._tokens_to_send(req)
        return self.in_flight.can_take(req.request_id, lane) and req.keeps_lane(lane, left) and left > 0

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        self._grant_decode_blocks()
        if self.waiting or any(r.status == S.PREFILLING for r in self.running):
            decision = self.placement.place(self.load() if self.placement.reads_load else None)
            kept = lane_kept_for_prompt_logprobs(self.running, decision.lane, self._has_chunk_for)  # (or it waits)
            decision = Placement(kept, None, "prompt logprobs: the lane of its first chunk") if kept else decision
            if self.in_flight.lane_free(decision.lane):
                batch = self._schedule_prefill(decision.lane, decision.token_budget, decision.bounds_step)
                self.placement_log.record(decision, batch)
        return SchedulerOutput(self.take_messages())

    def load(self) -> Load:
        """What the placement policy decides on: the decode batch, the queued prompt work, the oldest wait."""
        queued = [r for r in self.running if r.status == S.PREFILLING and self._has_chunk_for(r, DECODE)]
        queued += self.waiting
        admits = len(self.running) < self.config.max_num_seqs and not self.num_preempting
        to_send = [(self._tokens_to_send(r), r) for r in queued]
        tokens = sum(n for n, _ in to_send)
        held = sum(n for n, r in to_send  # what no prefill worker could take now
                   if not self.in_flight.can_take(r.request_id, PREFILL) or not admits and r.status == S.WAITING)
        oldest = min((r.arrival_time for r in queued), default=None)
        decoding = self.num_decoding
        return Load(num_decoding=decoding, queued_tokens=tokens,
                    oldest_wait_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
                    decode_step_ms=self.decode_step_ms, prefill_lane_busy=self.in_flight.beside,
                    mixed_step_room=self.token_budget - decoding,
                    decode_lane_busy=not self.in_flight.lane_free(DECODE), prefill_queued_tokens=tokens - held)

    def take_messages(self) -> list[tuple[str, object]]:
        """The messages decided so far and not yet sent (stops from `finish` are sent without waiting)."""
        out, self.outbox = self.outbox, []
        return out

    def _schedule_prefill(self, lane: str, budget: int | None = None, bounds_step: bool = False) -> InFlight | None:
        """One prefill batch for `lane` of at most `budget` tokens (default: the step's token budget): unfinished
        prompts first (arrival order), then waiting requests. A mixed step's decodes count against the budget.
        Returns the batch (None when nothing could be scheduled)."""
        decode_rows = self.num_decoding if lane == DECODE else 0
        budget = self.token_budget - decode_rows if budget is None else min(budget, self.token_budget - decode_rows)
        # the step it may share on the decode executor (decodes in): the core's budget unless the placement sized it
        planned = (budget + decode_rows if bounds_step else self.token_budget) if lane == DECODE else 0
        chunks: list[tuple[Request, int]] = []
        starts: dict[str, int] = {}  # a chunk behind one in flight on the lane starts after it
        for req in [r for r in self.running if r.status == S.PREFILLING and self._has_chunk_for(r, lane)]:
            if budget <= 0:
                break
            if req.status != S.PREFILLING:
                continue  # preempted while making room for an earlier one
            left = self._tokens_to_send(req)
            start, n = req.num_tokens - left, min(left, budget)
            # a chunk behind one in flight never preempts: the request is no victim then (it is in flight), so the
            # victim would be an older request, maybe one already in this batch; it waits for the answer instead
            held = req.request_id in self.in_flight
            grown = self.blocks.allocate(req.request_id, start + n) is not None if held else \
                self._grow(req, self.blocks, start + n)
            if not grown:
                break
            starts[req.request_id] = start  # (only now: a request that preempted itself may be admitted again below)
            chunks.append((req, n))
            budget -= n
        reserved = 0
        if self.reserve and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            reserved = self.reserve.reserved(self.running)
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and not self.num_preempting):
            req = self.waiting[0]
            n = self._admit(req, budget, reserved)
            if n is None:
                break
            self.waiting.popleft()
            req.status, req.prompt_lane = S.PREFILLING, lane
            self.running.append(req)
            chunks.append((req, n))
            budget -= n
            reserved += self.reserve.to_come(req) if self.reserve else 0
        if not chunks:
            return None
        batch = InFlight(next(self.batch_ids), chunks, sent_at=time.time())
        self.in_flight.add(lane, batch)
        work = [seq_work(r, n, self.blocks.block_table(r.request_id), starts.get(r.request_id)) for r, n in chunks]
        self.outbox.append((lane, PrefillBatch(batch.batch_id, work, planned)))
        return batch

    def _admit(self, req: Request, budget: int, reserved: int = 0) -> int | None:
        """A waiting request's first chunk: prefix-cache hits, then blocks for up to `budget` new tokens.
        None (holding nothing, so it can never block the pool) when the pool is short, or when what would be
        left free cannot hold the `reserved` blocks the running requests are expected to take and its own."""
        # prompt_logprobs need every prompt position computed: no prefix-cache hits for them (as vLLM)
        cached = 0 if req.params.prompt_logprobs is not None else self.blocks.match_prefix(req.request_id,
                                                                                            req.all_token_ids)
        req.num_computed_tokens = cached
        n = min(req.num_tokens - cached, budget)
        fits = self.blocks.allocate(req.request_id, cached + n) is not None
        fits = fits and (not self.separate_pools or fits_hand_off(self.decode_blocks, self.running, req))  # disagg
        if not fits or self.reserve and not self.reserve.admits(req, reserved):
            self.blocks.free(req.request_id)  # give the prefix hits back: a waiting request holds no blocks
            req.num_computed_tokens = 0
            return None
        if req.num_preemptions == 0:
            req.num_cached_tokens = cached
        return n

    def _grow(self, req: Request, pool: BlockManager, num_tokens: int) -> bool:
        """Blocks for num_tokens tokens of a running request; when short, preempt one request to make room."""
        if pool.allocate(req.request_id, num_tokens) is not None:
            return True
        self._make_room(req, pool)
        return req.status != S.WAITING and pool.allocate(req.request_id, num_tokens) is not None

    def _make_room(self, req: Request, pool: BlockManager) -> None:
        """Preempt the newest request holding blocks of `pool` (none with a batch in flight), which may be `req`
        itself (vLLM's rule). One victim at a time: a decoding victim frees its blocks on Dropped."""
        if self.num_preempting:
            return
        holders = [r for r in self.running if r.request_id not in self.in_flight
                   and (not self.separate_pools or (r.status == S.DECODING) == (pool is self.decode_blocks))]
        if holders:
            self._preempt(holders[-1])

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        if req.status == S.DECODING:
            req.status = S.PREEMPTED
            self.num_preempting += 1
            self.running.remove(req)
            self.outbox.append((DECODE, StopDecode([req.request_id])))
        else:
            self._requeue(req)

    def _requeue(self, req: Request) -> None:
        """Preemption by recompute: free the blocks, queue the request first, its prompt + outputs so far."""
        if req in self.running:
            self.running.remove(req)
        self._free_everywhere(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = S.WAITING
        self.waiting.appendleft(req)

    def _grant_decode_blocks(self) -> None:
        """Keep every decoding request `lookahead` tokens ahead; when even its next token has no block, make room."""
        pool = self.decode_blocks
        for req in [r for r in self.running if r.status == S.DECODING]:
            if req.status != S.DECODING:
                continue  # preempted while making room for an earlier one
            rid = req.request_id
            if pool.has_room(rid, req.num_tokens + 1 + pool.block_size):
                continue  # more than a block of room ahead: topped up once it is down to its last block
            want = min(req.num_tokens + self.lookahead_tokens, req.max_total_tokens, self.config.max_model_len)
            new = pool.allocate(rid, want)
            if new is None:
                new = pool.allocate(rid, req.num_tokens + 1)
                if new is None:
                    self._make_room(req, pool)
                    continue
            if new:
                self.outbox.append((DECODE, GrantBlocks(rid, new)))

    def _hand_off(self, req: Request, prefill_end: float) -> None:
        """The prompt is done: give the request to the decode executor (disagg: its KV is copied over)."""
        rid = req.request_id
        src = self.blocks.detach(rid) if self.separate_pools else []
        want = min(req.num_tokens + self.lookahead_tokens, req.max_total_tokens, self.config.max_model_len)
        if self.decode_blocks.allocate(rid, want) is None and self.decode_blocks.allocate(rid, req.num_tokens) is None:
            self.blocks.release(src)
            self.num_preemptions += 1
            self._requeue(req)  # not even room for its KV: recompute later
            return
        if src:
            self.transfers[rid] = src
        req.status = S.DECODING
        self.outbox.append((DECODE, StartDecode(rid, req.prompt_token_ids, list(req.output_token_ids),
                                                list(self.decode_blocks.block_table(rid)), req.params, prefill_end,
                                                src_block_ids=src)))

    # ------------------------------------------------------------------ worker results
    def update_from_output(self, msg) -> list[Request]:
        """Apply one worker result; return the requests with new output (those that ended included)."""
        if isinstance(msg, PrefillDone):
            return self._on_prefill_done(msg)
        if isinstance(msg, DecodeStep):
            return self._on_decode_step(msg)
        if isinstance(msg, Dropped):
            for rid in msg.request_ids:
                self._on_dropped(rid)
        elif isinstance(msg, Transferred):
            for rid in msg.request_ids:
                self.blocks.release(self.transfers.pop(rid, []))
        return []

    def _on_prefill_done(self, msg: PrefillDone) -> list[Request]:
        lane, chunks = self.in_flight.pop(msg.batch_id, (msg.t_start, msg.t_end))
        beside = lane == DECODE and self.in_flight.ran_beside(msg.t_start, msg.t_end)  # a mixed step beside a batch
        tokens = msg.num_tokens if msg.step_tokens is None else msg.step_tokens  # (a step of several: learned once)
        if beside is not None and tokens:
            decoding = 0 if msg.device is not None and msg.device.kind == "inline" else self.num_decoding  # (timed)
            self.placement.observe_prefill(lane, tokens, msg.t_end - msg.t_start, decoding, beside)
        sampled = {s.request_id: s for s in msg.sampled}
        touched = []
        for req, n in chunks:
            if req.status == S.STOPPING:
                if req.request_id not in self.in_flight:  # (a chunk behind it still writes its KV: released after it)
                    self._release(req)
                continue
            req.num_computed_tokens += n
            self.blocks.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
            tok = sampled.get(req.request_id)
            if tok is None:
                continue  # a chunk short of the prompt's end
            touched.append(req)
            reason = self._append(req, tok, msg.t_end)
            if reason is not None:
                self.finish(req, reason)
            else:
                self._hand_off(req, msg.t_end)
        return touched

    def _on_decode_step(self, msg: DecodeStep) -> list[Request]:
        if msg.sampled:  # the step period the placement plans with (idle gaps between steps included)
            # (a timed step's interval holds the device's wait for the host already: rapid/worker/decode_loop.py)
            step_ms = (msg.t_end - msg.t_start + (0.0 if msg.device is not None else msg.idle_gap_s)) * 1e3
            self.decode_step_ms = ewma(self.decode_step_ms, step_ms)
            # a mixed step's time is learned through its PrefillDone; the step says what it ran (untimed: a chunk
            # on the decode lane may have been in it; with more held, it may also be a later step's)
            mixed = msg.device.kind == "mixed" if msg.device is not None else self.in_flight.busy(DECODE)
            beside = self.in_flight.ran_beside(msg.t_start, msg.t_end)  # by when it ran, not by what is in flight
            if beside is not None:
                self.placement.observe_decode_step(step_ms, beside_prefill=beside, mixed=mixed)
        worker_finished = set(msg.finished)
        touched = []
        for tok in msg.sampled:
            req = self.requests.get(tok.request_id)
            if req is None:
                continue
            done_by_worker = tok.request_id in worker_finished
            if req.status != S.DECODING:  # stopping or preempted: the token is not wanted; the worker answers
                continue  # the StopDecode sent for it with Dropped (even if it ended it first): freed then
            touched.append(req)
            reason = self._append(req, tok, msg.t_end)
            if reason is not None or done_by_worker:
                self.finish(req, reason or "length", worker_finished=done_by_worker)
        return touched

    def _append(self, req: Request, tok: SampledToken, now: float) -> str | None:
        reason = req.append_token(tok.token_id, now)
        matched = self.on_token(req, tok)
        if matched is not None:
            reason, req.stop_reason = "stop", matched
        return reason

    def _on_dropped(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        if req.status == S.PREEMPTED:
            self.num_preempting -= 1
            self._requeue(req)
        elif req.status == S.STOPPING:
            self._release(req)

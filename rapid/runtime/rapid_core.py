"""The engine core of mode 'rapid' (its own process): admission, prefill scheduling, KV block accounting,
hand-off to the decode worker, detokenisation, stop strings.

Request life: WAITING -> PREFILLING (chunks sent to the prefill worker, one batch in flight) ->
DECODING (owned by the decode worker) -> finished. The core owns block accounting; a block is only
reused after the worker that last touched it said so (PrefillDone for the batch, Dropped or a
finished DecodeStep for decode).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
import itertools
import logging
import os
import time
from collections import deque

import zmq

from rapid.config import EngineConfig
from rapid.protocol import (
    AbortRequest, AddRequest, CoreInput, DecodeStep, Dropped, EngineOutputs, GetStats, GrantBlocks, PrefillBatch,
    PrefillDone, RequestDelta, SampledToken, SeqWork, Shutdown, StartDecode, Stats, StopDecode, Transferred,
    WorkerReady,
    WorkerResult,
)
from rapid.runtime import ipc
from rapid.runtime.block_manager import BlockManager
from rapid.runtime.output_processor import OutputProcessor
from rapid.runtime.request import Request
from rapid.runtime.scheduler import check_fits, reserve_chunk
from rapid.runtime.workers import WorkerArgs, _child_setup, decode_args

logger = logging.getLogger(__name__)
STATS_WINDOW = 4096


@dataclass
class _Blocks:
    """Blocks held on behalf of a request (the BlockManager.free interface)."""

    request_id: str
    block_ids: list[int]


class Phase(enum.Enum):
    WAITING = 0
    PREFILLING = 1
    DECODING = 2
    STOPPING = 3  # asked the decode worker to drop it; blocks freed on Dropped


class RapidCore:
    def __init__(self, config: EngineConfig, num_blocks: int, tokenizer, eos_token_ids, send_prefill, send_decode,
                 num_decode_blocks: int = 0):
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        # rapid: one pool shared by both workers. disagg: `blocks` is the prefill GPU's pool and
        # `decode_blocks` the decode GPU's; a hand-off copies the KV from the first to the second.
        self.blocks = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.disagg = config.mode == "disagg"
        self.decode_blocks = (BlockManager(num_decode_blocks, config.cache.block_size, enable_prefix_caching=False)
                              if self.disagg else self.blocks)
        self.transfers: dict[str, _Blocks] = {}
        self.budget_controller = None
        if config.rapid.tpot_target_ms is not None:
            from rapid.runtime.controller import PrefillBudgetController

            budget = config.scheduler.max_num_batched_tokens
            self.budget_controller = PrefillBudgetController(config.rapid.tpot_target_ms, budget,
                                                             min_budget=min(256, budget))  # disagg: prefill blocks held until the decode worker copied them
        self.outputs = OutputProcessor(tokenizer)
        self.send_prefill, self.send_decode = send_prefill, send_decode
        self.requests: dict[str, Request] = {}
        self.phase: dict[str, Phase] = {}
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not finished (chunked), in arrival order
        self.in_flight: tuple[int, list[SeqWork]] | None = None
        self.aborted_in_flight: set[str] = set()
        self.preempt_after_drop: set[str] = set()
        self.batch_ids = itertools.count()
        self.deltas: list[RequestDelta] = []
        self.stats = Stats([], [], [], [])

    # ------------------------------------------------------------------ frontend messages
    def add_request(self, msg: AddRequest) -> None:
        req = Request(msg.request_id, list(msg.prompt_token_ids), msg.params, self.eos_token_ids,
                      arrival_time=msg.arrival_time or time.time())
        try:
            check_fits(req, self.config.scheduler, min(self.blocks, self.decode_blocks, key=lambda b: b.num_blocks))
            if msg.request_id in self.requests:
                raise ValueError(f"request id {msg.request_id!r} is already in use")
        except ValueError as e:  # the frontend checks first; this is the backstop
            req.finish_reason = "abort"
            self.deltas.append(RequestDelta(msg.request_id, [], "", finished=True, finish_reason="abort", error=str(e)))
            return
        self.requests[req.request_id] = req
        self.phase[req.request_id] = Phase.WAITING
        self.waiting.append(req)
        self.outputs.add_request(req)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or self.phase[rid] == Phase.STOPPING:
                continue
            self._finish(req, "abort", None)

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        """End a request for the frontend now; free its blocks as soon as no worker can touch them."""
        rid = req.request_id
        req.finish_reason, req.stop_reason = reason, stop_reason
        phase = self.phase[rid]
        self.deltas.append(self.outputs.delta(req, finished=True))
        if phase == Phase.DECODING:
            self.phase[rid] = Phase.STOPPING
            self.send_decode(StopDecode([rid]))
            return
        if phase == Phase.WAITING:
            self.waiting.remove(req)
        elif phase == Phase.PREFILLING:
            self.prefilling.remove(req)
            if rid in self._in_flight_ids():
                self.aborted_in_flight.add(rid)  # freed when the batch comes back
                self.phase[rid] = Phase.STOPPING
                return
        self._release(req)

    def _pool(self, req: Request) -> BlockManager:
        """The pool that holds the request's blocks now (decode pool once handed off, in disagg)."""
        if self.disagg and self.phase.get(req.request_id) in (Phase.DECODING, Phase.STOPPING):
            return self.decode_blocks
        return self.blocks

    def _release(self, req: Request) -> None:
        self._pool(req).free(req)
        self.requests.pop(req.request_id, None)
        self.phase.pop(req.request_id, None)
        self.outputs.drop(req.request_id)

    def _in_flight_ids(self) -> set[str]:
        return {w.request_id for w in self.in_flight[1]} if self.in_flight else set()

    # ------------------------------------------------------------------ prefill scheduling
    def maybe_dispatch_prefill(self) -> None:
        """Send the next prefill batch if the prefill worker is idle: unfinished prompts first, then new ones."""
        if self.in_flight is not None:
            return
        budget = self.prefill_budget
        work: list[SeqWork] = []
        for req in list(self.prefilling):
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.allocate(req, req.num_computed_tokens + n):
                break
            work.append(self._seq_work(req, n))
            budget -= n
        max_seqs = self.config.scheduler.max_num_seqs
        while self.waiting and budget > 0 and len(self.requests) - len(self.waiting) < max_seqs:
            req = self.waiting[0]
            n = reserve_chunk(req, self.blocks, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.prefilling.append(req)
            self.phase[req.request_id] = Phase.PREFILLING
            work.append(self._seq_work(req, n))
            budget -= n
        if work:
            batch_id = next(self.batch_ids)
            self.in_flight = (batch_id, work)
            self.send_prefill(PrefillBatch(batch_id, work))

    @property
    def prefill_budget(self) -> int:
        """Prefill tokens per launch: fixed, or set by the TPOT controller."""
        if self.budget_controller is not None:
            return self.budget_controller.budget
        return self.config.scheduler.max_num_batched_tokens

    @staticmethod
    def _seq_work(req: Request, n: int) -> SeqWork:
        start = req.num_computed_tokens
        return SeqWork(req.request_id, req.all_token_ids[start : start + n], start, list(req.block_ids),
                       start + n == req.num_tokens, req.params, len(req.output_token_ids),
                       req.prompt_token_ids, req.output_token_ids)

    # ------------------------------------------------------------------ worker results
    def on_prefill_done(self, msg: PrefillDone) -> None:
        if self.in_flight is None or self.in_flight[0] != msg.batch_id:
            logger.warning("unexpected PrefillDone for batch %d", msg.batch_id)
            return
        _, work = self.in_flight
        self.in_flight = None
        self._record(self.stats.prefill_intervals, (msg.t_start, msg.t_end))
        self._record(self.stats.prefill_tokens, sum(len(w.token_ids) for w in work))
        sampled = {s.request_id: s for s in msg.sampled}
        for w in work:
            rid = w.request_id
            if rid in self.aborted_in_flight:
                self.aborted_in_flight.discard(rid)
                self._release(self.requests[rid])
                continue
            req = self.requests[rid]
            req.num_computed_tokens += len(w.token_ids)
            self.blocks.commit(req)
            if not w.sample:
                continue
            self.prefilling.remove(req)
            if self._on_token(req, sampled[rid]):
                self._release(req)
                continue
            self._hand_off(req, msg.t_end)

    def _hand_off(self, req: Request, prefill_end: float) -> None:
        lookahead = self.config.rapid.decode_lookahead_blocks * self.blocks.block_size
        want = min(req.num_tokens + lookahead, req.max_total_tokens, self.config.scheduler.max_model_len)
        src: list[int] = []
        if self.disagg:  # the KV moves: decode-pool blocks for it, prefill blocks kept until copied
            src, req.block_ids = req.block_ids, []
        pool = self.decode_blocks
        if not pool.allocate(req, want) and not pool.allocate(req, req.num_tokens):
            if self.disagg:
                pool.free(req)
                req.block_ids = src
            self._preempt(req)  # not even room for its next token: recompute later
            return
        if self.disagg:
            self.transfers[req.request_id] = _Blocks(req.request_id, src)
        self.phase[req.request_id] = Phase.DECODING
        self.send_decode(StartDecode(req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                                     list(req.block_ids), req.params, prefill_end, src_block_ids=src))

    def on_transferred(self, msg: Transferred) -> None:
        """disagg: the decode worker copied these requests' KV; their prefill-pool blocks are free again."""
        for rid in msg.request_ids:
            held = self.transfers.pop(rid, None)
            if held is not None:
                self.blocks.free(held)

    def on_decode_step(self, msg: DecodeStep) -> None:
        self._record(self.stats.decode_intervals, (msg.t_start, msg.t_end))
        self._record(self.stats.decode_batch_sizes, len(msg.sampled))
        if self.budget_controller is not None and msg.sampled:
            self.budget_controller.observe_decode_step((msg.t_end - msg.t_start + msg.idle_gap_s) * 1e3)
        if msg.idle_gap_s:
            self._record(self.stats.decode_idle_gaps_s, msg.idle_gap_s)
        for h in msg.handoffs:
            self._record(self.stats.handoff_s, h)
        worker_finished = set(msg.finished)
        for tok in msg.sampled:
            req = self.requests.get(tok.request_id)
            if req is None or self.phase.get(tok.request_id) != Phase.DECODING:
                if tok.request_id in worker_finished and req is not None:
                    self._release(req)  # was stopping; the worker dropped it itself
                continue
            done = self._on_token(req, tok, worker_finished=tok.request_id in worker_finished)
            if done and tok.request_id in worker_finished:
                self._release(req)
        self._grant_blocks()

    def on_dropped(self, msg: Dropped) -> None:
        for rid in msg.request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if rid in self.preempt_after_drop:
                self.preempt_after_drop.discard(rid)
                self._requeue(req)
            else:
                self._release(req)
        self._grant_blocks()  # freed blocks may unblock a stalled decode

    def _on_token(self, req: Request, tok: SampledToken, worker_finished: bool = False) -> bool:
        """Record a token, emit its delta; True when the request finished (phase left for the caller)."""
        req.num_computed_tokens = req.num_tokens
        reason = req.append_token(tok.token_id)
        if reason is None and req.num_tokens >= self.config.scheduler.max_model_len:
            reason = "length"
        matched = self.outputs.on_token(req, tok)
        if matched is not None:
            reason, req.stop_reason = "stop", matched
        if reason is None:
            self.deltas.append(self.outputs.delta(req, finished=False))
            return False
        if self.phase[req.request_id] == Phase.DECODING and not worker_finished:
            self._finish(req, reason, req.stop_reason)  # -> STOPPING until Dropped
            return False
        req.finish_reason = reason
        self.deltas.append(self.outputs.delta(req, finished=True))
        return True

    # ------------------------------------------------------------------ blocks for decoding requests
    def _grant_blocks(self) -> None:
        """Keep every decoding request `lookahead` blocks ahead; preempt the newest when the pool is short."""
        lookahead = self.config.rapid.decode_lookahead_blocks * self.decode_blocks.block_size
        decoding = [r for r in self.requests.values() if self.phase[r.request_id] == Phase.DECODING]
        for req in decoding:
            if self.phase[req.request_id] != Phase.DECODING:
                continue
            want = min(req.num_tokens + lookahead, req.max_total_tokens, self.config.scheduler.max_model_len)
            if self.decode_blocks.blocks_needed(want) <= len(req.block_ids):
                continue
            before = len(req.block_ids)
            while not self.decode_blocks.allocate(req, want):
                if self.decode_blocks.blocks_needed(req.num_tokens + 1) <= len(req.block_ids):
                    break  # has room for the next token; retry the lookahead later
                # Preempt the newest decoding request, which may be this one.
                # Its blocks return on Dropped (the worker may be mid-step): retry then, one victim at a time.
                if self.preempt_after_drop:
                    break
                victim = [r for r in decoding if self.phase[r.request_id] == Phase.DECODING][-1]
                self._preempt(victim)
                break
            if len(req.block_ids) > before and self.phase[req.request_id] == Phase.DECODING:
                self.send_decode(GrantBlocks(req.request_id, req.block_ids[before:]))

    def _preempt(self, req: Request) -> None:
        self.stats.num_preemptions += 1
        if self.phase[req.request_id] == Phase.DECODING:
            self.phase[req.request_id] = Phase.STOPPING
            self.preempt_after_drop.add(req.request_id)
            self.send_decode(StopDecode([req.request_id]))
        else:
            self._requeue(req)

    def _requeue(self, req: Request) -> None:
        """Preemption by recompute: free the blocks, queue the request first, prompt + outputs so far."""
        self._pool(req).free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.phase[req.request_id] = Phase.WAITING
        self.waiting.appendleft(req)

    @staticmethod
    def _record(series: list, value) -> None:
        series.append(value)
        if len(series) > STATS_WINDOW:
            del series[: len(series) - STATS_WINDOW]

    def snapshot_stats(self) -> Stats:
        s = self.stats
        pools = [self.blocks] + ([self.decode_blocks] if self.disagg else [])
        s.num_free_blocks = sum(p.num_free_blocks for p in pools)
        s.num_blocks = sum(p.num_blocks for p in pools)
        s.num_requests = len(self.requests) + len(self.transfers)
        return s

    def take_deltas(self) -> list[RequestDelta]:
        out, self.deltas = self.deltas, []
        return out


def core_main(raw_args: bytes) -> None:
    args: WorkerArgs = decode_args(raw_args)
    _child_setup(args)
    from rapid.runtime.loading import load_tokenizer

    ctx = zmq.Context()
    inbox = ipc.Channel(ctx, zmq.PULL, args.endpoints["core_in"], bind=True, decode_type=CoreInput)
    outbox = ipc.Channel(ctx, zmq.PUSH, args.endpoints["core_out"], bind=False)
    results = ipc.Channel(ctx, zmq.PULL, args.endpoints["worker_out"], bind=True, decode_type=WorkerResult)
    to_prefill = ipc.Channel(ctx, zmq.PUSH, args.endpoints["prefill_in"], bind=False)
    to_decode = ipc.Channel(ctx, zmq.PUSH, args.endpoints["decode_in"], bind=False)
    ready = ipc.Channel(ctx, zmq.PUSH, args.endpoints["ready"], bind=False)
    try:
        tokenizer = load_tokenizer(args.config.tokenizer)
        core = RapidCore(args.config, args.num_blocks, tokenizer, args.eos_token_ids, to_prefill.send, to_decode.send,
                         num_decode_blocks=args.peer_num_blocks)
        ready.send(WorkerReady(args.name, os.getpid()))
        poller = zmq.Poller()
        poller.register(inbox.sock, zmq.POLLIN)
        poller.register(results.sock, zmq.POLLIN)
        running = True
        while running:
            poller.poll(50)
            for msg in results.drain():
                if isinstance(msg, PrefillDone):
                    core.on_prefill_done(msg)
                elif isinstance(msg, DecodeStep):
                    core.on_decode_step(msg)
                elif isinstance(msg, Dropped):
                    core.on_dropped(msg)
                elif isinstance(msg, Transferred):
                    core.on_transferred(msg)
            for msg in inbox.drain():
                if isinstance(msg, AddRequest):
                    core.add_request(msg)
                elif isinstance(msg, AbortRequest):
                    core.abort(msg.request_ids)
                elif isinstance(msg, GetStats):
                    outbox.send(core.snapshot_stats())
                elif isinstance(msg, Shutdown):
                    running = False
            core.maybe_dispatch_prefill()
            deltas = core.take_deltas()
            if deltas:
                outbox.send(EngineOutputs(deltas))
    except Exception:
        logger.exception("engine core failed")
        raise
    finally:
        for ch in (inbox, outbox, results, to_prefill, to_decode, ready):
            ch.close()
        ctx.term()

"""EngineCore: the one engine core of every mode (scheduler, KV block accounting, output processing).

Each `step()` sends what the scheduler decides, then applies the workers' results to it. Where the workers live is
hidden behind a small `Workers` interface: in this process (mode 'hybrid': `rapid.engine.inproc`, which runs one
forward pass per poll) or behind ZeroMQ sockets (modes 'rapid' and 'disagg', and 'hybrid' with engine_process:
`core_main`, the engine-core process). Plain Python: no torch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Protocol

from rapid.config import EngineConfig, fit_to_pool
from rapid.core.block_manager import BlockManager
from rapid.core.output_processor import OutputProcessor
from rapid.core.adaptive import make_placement
from rapid.core.request import Request
from rapid.core.scheduler import Scheduler
from rapid.protocol.engine import AddRequest, RequestDelta, Stats
from rapid.protocol.worker import DecodeStep, PrefillBatch, PrefillDone

logger = logging.getLogger(__name__)
STATS_WINDOW = 4096  # recent step timings kept for stats


class Workers(Protocol):
    """How the core reaches its executors, by lane ('decode', 'prefill', 'prefill2': rapid/core/placement.py)."""

    def send(self, lane: str, msg) -> None: ...

    def poll(self) -> list:
        """Results produced since the last poll (PrefillDone, DecodeStep, Dropped, Transferred)."""
        ...


class StepStats:
    """The recent worker timings that `Stats` reports, each series bounded to STATS_WINDOW entries."""

    def __init__(self):
        names = ("prefill_intervals", "decode_intervals", "decode_idle_gaps_s", "handoff_s", "prefill_tokens",
                 "decode_batch_sizes", "decode_device_idle", "prefill_host_s", "prefill_idle_gaps_s")
        self.series = {n: deque(maxlen=STATS_WINDOW) for n in names}
        self.device_time: dict[str, list[float]] = {}  # kind -> [steps, busy_s, idle_s], since start
        self.eager_steps: dict[str, int] = {}  # kind -> steps run outside the worker's captured graphs, since start
        self.decode_idle_totals: dict[str, list[float]] = {}  # see Stats.decode_idle_totals
        self.last_decode_kind = "idle"  # the decode stream's latest step kind (an inline prompt-only step included)

    def record(self, msg) -> None:
        s = self.series
        if isinstance(msg, (PrefillDone, DecodeStep)) and msg.device is not None:
            total = self.device_time.setdefault(msg.device.kind, [0, 0.0, 0.0])
            total[0] += 1
            total[1] += msg.device.busy_s
            total[2] += msg.device.idle_s
            if msg.device.eager:
                self.eager_steps[msg.device.kind] = self.eager_steps.get(msg.device.kind, 0) + 1
        if isinstance(msg, PrefillDone):
            if msg.device is not None and msg.device.kind == "inline":  # a prompt-only step on the decode stream
                self.last_decode_kind = "inline"
            s["prefill_intervals"].append((msg.t_start, msg.t_end))
            s["prefill_tokens"].append(msg.num_tokens)
            s["prefill_host_s"].append(msg.host_s)  # 0 for a mixed step's prompt part (not a prefill worker's)
            s["prefill_idle_gaps_s"].append(msg.idle_gap_s)
        elif isinstance(msg, DecodeStep):
            s["decode_intervals"].append((msg.t_start, msg.t_end))
            s["decode_batch_sizes"].append(len(msg.sampled))
            if msg.device is not None:
                s["decode_device_idle"].append((msg.device.kind, msg.device.idle_s, len(msg.sampled), msg.after_idle))
                self._count_idle(msg.device.kind, msg.device.idle_s, msg.after_idle)
            if msg.idle_gap_s:
                s["decode_idle_gaps_s"].append(msg.idle_gap_s)
            s["handoff_s"].extend(msg.handoffs)

    def _count_idle(self, kind: str, idle_s: float, after_idle: bool) -> None:
        """One decode-stream step's wait, by the kind of the step before it ("idle": the executor had had nothing
        resident, so the wait is not host overhead)."""
        before = "idle" if after_idle else self.last_decode_kind
        total = self.decode_idle_totals.setdefault(f"{before} -> {kind}", [0, 0.0, 0, 0.0])
        total[0] += 1
        total[1] += idle_s
        if idle_s > 1e-3:
            total[2] += 1
            total[3] += idle_s
        self.last_decode_kind = kind

    def snapshot(self, **counters) -> Stats:
        return Stats(**{name: list(values) for name, values in self.series.items()},
                     device_time={kind: list(total) for kind, total in self.device_time.items()},
                     eager_steps=dict(self.eager_steps),
                     decode_idle_totals={k: list(v) for k, v in self.decode_idle_totals.items()}, **counters)


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids, workers: Workers, num_blocks: int,
                 num_decode_blocks: int = 0):
        """`num_decode_blocks`: mode 'disagg', the decode GPU's own pool (0: one pool serves both lanes)."""
        config = fit_to_pool(config, num_decode_blocks or num_blocks)  # as the decode executor fitted it
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.workers = workers
        cache = config.cache
        blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        decode_blocks = (BlockManager(num_decode_blocks, cache.block_size, enable_prefix_caching=False)
                         if num_decode_blocks else None)
        self.outputs = OutputProcessor(tokenizer)
        self.scheduler = Scheduler(config.scheduler, blocks, decode_blocks=decode_blocks,
                                   lookahead_blocks=config.rapid.decode_lookahead_blocks,
                                   placement=make_placement(config), on_token=self.outputs.on_token)
        self.stats = StepStats()
        self.progressed = False  # the last step applied worker results
        self.preempted: set[str] = set()  # said to be preempted (RequestDelta.preempted), not yet scheduled again
        self._preemptions_seen = 0  # the scheduler's num_preemptions when they were last looked for

    @property
    def num_blocks(self) -> int:
        return self.scheduler.num_blocks

    def add_request(self, msg: AddRequest) -> None:
        """Queue a request; ValueError (nothing queued) if it can never run or its id is in use."""
        req = Request(msg.request_id, list(msg.prompt_token_ids), msg.params, self.eos_token_ids,
                      arrival_time=msg.arrival_time or time.time())
        self.scheduler.add_request(req)
        self.outputs.add_request(req)

    def abort(self, request_ids: list[str]) -> list[RequestDelta]:
        """End these requests now; their final deltas (finish_reason 'abort')."""
        deltas = []
        for rid in request_ids:
            req = self.scheduler.requests.get(rid)
            if req is None or req.status.is_done:
                continue
            self.scheduler.finish(req, "abort")
            self.preempted.discard(rid)
            deltas.append(self.outputs.delta(req, finished=True))
        self._send(self.scheduler.take_messages())  # the executors stop working on them now
        return deltas

    def _send(self, messages: list[tuple[str, object]]) -> None:
        for lane, msg in messages:
            self.workers.send(lane, msg)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        self.scheduler.set_token_budget(max_num_batched_tokens)

    def step(self) -> list[RequestDelta]:
        """Send the scheduler's decisions, then apply the workers' results; return the new output.

        In-process the poll runs the forward pass of what was just sent; across processes it collects what
        the workers finished meanwhile (`progressed` says whether anything came, so the caller polls again
        at once). Hand-offs and stops that the results decide are sent before returning.
        """
        messages = self.scheduler.schedule().messages
        news = self._stamp_scheduled(messages)
        self._send(messages)
        deltas = []
        results = self.workers.poll()
        for msg in results:
            self.stats.record(msg)
            for req in self.scheduler.update_from_output(msg):
                deltas.append(self.outputs.delta(req, finished=req.status.is_done))
        news += self._newly_preempted()
        if news:  # scheduled (first, or again) or preempted: said now, unless a result above spoke for it
            spoken = {d.request_id for d in deltas}
            deltas += [self.outputs.delta(r, finished=False) for r in news
                       if r.request_id not in spoken and not r.status.is_done]
        self._send(self.scheduler.take_messages())
        self.progressed = bool(results)
        return deltas

    def _stamp_scheduled(self, messages: list[tuple[str, object]]) -> list[Request]:
        """The requests that these messages put in a batch for the first time (every request starts with a prefill
        batch), stamped with the time (RequestDelta.first_scheduled_time: the end of their queue time), and those
        they take again after a preemption."""
        new, again = [], []
        for _, msg in messages:
            if isinstance(msg, PrefillBatch):
                for work in msg.work:
                    req = self.scheduler.requests.get(work.request_id)
                    if req is not None and not req.first_scheduled_time:
                        new.append(req)
                    elif req is not None and work.request_id in self.preempted:
                        self.preempted.discard(work.request_id)
                        again.append(req)
        now = time.time() if new else 0.0
        for req in new:
            req.first_scheduled_time = now
        return new + again

    def _newly_preempted(self) -> list[Request]:
        """The requests preempted since the last look (and not in a batch again already): RequestDelta.preempted."""
        s = self.scheduler
        if s.num_preemptions == self._preemptions_seen:
            return []
        self._preemptions_seen = s.num_preemptions
        new = [r for r in s.requests.values() if r.is_preempted and r.request_id not in self.preempted]
        self.preempted.update(r.request_id for r in new)
        return new

    def get_stats(self) -> Stats:
        s = self.scheduler
        learned = getattr(s.placement, "learned", None)  # optional in a policy (rapid.core.placement)
        return self.stats.snapshot(num_preemptions=s.num_preemptions, num_free_blocks=s.num_free_blocks,
                                   num_blocks=sum(p.num_blocks for p in s.pools),
                                   num_requests=len(s.requests) + len(s.transfers),
                                   placement_policy=s.placement_log.policy, placement=s.placement_log.current,
                                   prefill_batches_by_lane=dict(s.placement_log.batches),
                                   prefill_tokens_by_lane=dict(s.placement_log.tokens),
                                   prefill_batches_by_reason=dict(s.placement_log.reasons),
                                   placement_learned=learned() if learned else {})

"""Replay a trace through a placement policy on step timings recorded on the GPU (no GPU needed).

The engine's lanes in simulated time: the decode executor steps its batch back to back (a mixed step when the
policy put prefill tokens in it) and the prefill worker runs one batch at a time beside it (with `second`, a second
prefill worker at another MPS share, recorded at its own split; one prefill batch between the two at a time).
Step costs come from `rapid bench frontier` on the GPU (`StepTimings.from_frontier`): per decode batch, the step
alone, the step while the prefill worker runs at an MPS split and that worker's tokens/s then, and a mixed step's
cost per prompt token, or (`with_graph_curve`) a whole-graph step's cost by its padded token count. Beside a prefill
batch the two lanes share the GPU as recorded at the prefill worker's split: a decode step's work runs slower by the
recorded ratio (concurrent over alone, both from that split's recording) for the part of it that a prefill batch
overlaps, and at its speed alone for the rest (its end is recomputed whenever a prefill batch starts or ends). The
same policy objects as the engine's decide (rapid.core.placement, rapid.core.adaptive), so their choices in known
regimes are unit tests on the CPU. Plain Python, no torch.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rapid.compile.buckets import PRUNE_MARGIN, candidate_buckets, undominated
from rapid.core.placement import DECODE, PREFILL, PREFILL2, PREFILL_LANES, Load, ewma


# Llama-3.1-8B on the H200 (bench/results/session17/call1/step-profile.json): decode attention took 9.17 ms of a
# batch-256 step at contexts 1,000-1,060, reading the KV at 3.7 TB/s
H200_8B_ATTENTION_MS_PER_CONTEXT_TOKEN = 9.17 / (256 * 1030)
# what MPS adds to one step with prompt tokens (a whole CUDA graph) of Llama-3.1-8B on the H200, whatever its size
# (median over six shapes of 112-480 tokens, 0.65-0.80 ms each, with or without a thread percentage or an idle second
# client: bench/results/session24/call3/mps-cost/mps-cost.md). Rapid's workers run under MPS, hybrid does not. The
# recorded decode steps alone come from rapid's decode worker, so under MPS already (0.10-0.24 ms over hybrid's).
# Session 25 traced most of it to the paged prefill kernel's tile map, built in every layer by small eager kernels
# that MPS slowed; built once per step (d443cf2), MPS adds 0.05-0.13 ms. The recorded step timings are from the
# code before, and this figure goes with them.
H200_8B_MPS_PROMPT_STEP_MS = 0.745


@dataclass(frozen=True)
class StepTimings:
    """Recorded costs at one MPS split (see the module docstring); batches ascending."""

    split: str
    batches: list[int]
    decode_alone_ms: list[float]
    decode_concurrent_ms: list[float]  # the decode step while the prefill worker runs beside it
    prefill_concurrent_tok_s: list[float]  # the prefill worker's rate then
    inline_tok_s: float  # prompt tokens/s inside a mixed step (hybrid points: the median over the recorded ones)
    # whole-graph steps as bench/graph_buckets.py records them: (tokens, ms) of a step with nothing decoding, tokens
    # ascending. Given, a mixed step's prompt work is what the curve adds from its decode rows alone to the whole
    # batch padded to its bucket (the sizes the engine keeps: rapid.compile.buckets.undominated), not inline_tok_s
    graph_ms: tuple[tuple[int, float], ...] = ()
    # decode attention's ms per token of context summed over the batch: given, a decode step is the recorded one
    # (at recorded_ctx tokens a row) moved by the batch's own context (the frontier decodes at 1024 tokens; real
    # traces mostly shorter); 0: the recorded step whatever the context
    ms_per_context_token: float = 0.0
    recorded_ctx: int = 1024

    @classmethod
    def from_frontier(cls, path: str | Path, split: str) -> "StepTimings":
        points = json.loads(Path(path).read_text())["points"]
        rapid = sorted((p for p in points if p["mode"] == "rapid" and p.get("split") == split
                        and p.get("tpot_mean_ms")), key=lambda p: p["batch"])
        hybrid = [p for p in points if p["mode"] == "hybrid" and p.get("tpot_mean_ms")]
        if not rapid or not hybrid:
            raise ValueError(f"{path}: needs rapid points at split {split!r} and hybrid points")
        # a mixed step's prompt rate: the prompt tokens of the window over the window less its decode work (not
        # chunk / (TPOT - decode alone): on the H200 not every step of the window carried a chunk)
        rates = [p["prefill_tok_s"] * p["window_s"] / (p["window_s"] - p["decode_steps"] * p["decode_alone_ms"] * 1e-3)
                 for p in hybrid if p["window_s"] > p["decode_steps"] * p["decode_alone_ms"] * 1e-3]
        return cls(split, [p["batch"] for p in rapid], [p["decode_alone_ms"] for p in rapid],
                   [p["tpot_mean_ms"] for p in rapid], [p["prefill_tok_s"] for p in rapid],
                   sorted(rates)[len(rates) // 2])

    def with_graph_curve(self, path: str | Path, decodes: int = 0) -> "StepTimings":
        """These timings with mixed steps costed on a recorded whole-graph curve (graph-buckets.json)."""
        curve = json.loads(Path(path).read_text())["ms_by_decodes_and_tokens"][str(decodes)]
        return replace(self, graph_ms=tuple(sorted((int(t), float(ms)) for t, ms in curve.items())))

    @functools.cached_property
    def _graph_buckets(self) -> list[int]:
        ms = dict(self.graph_ms)
        return undominated({t: ms[t] for t in candidate_buckets(max(ms)) if t in ms}, PRUNE_MARGIN)

    def _graph_step_ms(self, tokens: int, padded: bool) -> float:
        """A whole-graph step of `tokens` (padded: to its bucket), read off the curve (linear past its end)."""
        sizes, ms = [t for t, _ in self.graph_ms], [m for _, m in self.graph_ms]
        if tokens > sizes[-1]:
            return ms[-1] * tokens / sizes[-1]
        if padded:
            tokens = next(b for b in self._graph_buckets if b >= tokens)
        return float(np.interp(tokens, sizes, ms))

    def with_context_cost(self, ms_per_context_token: float, recorded_ctx: int = 1024) -> "StepTimings":
        """These timings with decode steps moved by their batch's context (see ms_per_context_token)."""
        return replace(self, ms_per_context_token=ms_per_context_token, recorded_ctx=recorded_ctx)

    def decode_ms(self, batch: int, concurrent: bool, context: int | None = None) -> float:
        """A decode step of `batch` rows (`context`: their tokens so far, summed; None: as recorded)."""
        ms = float(np.interp(batch, self.batches, self.decode_concurrent_ms if concurrent else self.decode_alone_ms))
        if context is None or not self.ms_per_context_token:
            return ms
        return max(ms + self.ms_per_context_token * (context - batch * self.recorded_ctx), 0.3 * ms)

    def decode_slowdown(self, batch: int) -> float:
        """How much slower a decode step of `batch` rows runs while this split's prefill worker computes: its time
        concurrent over its time alone, both recorded at this split (the same GPU, the same step). A ratio, as the
        GPU's share left to the decodes: a step at a shorter context, less work, loses as much of its speed."""
        return float(np.interp(batch, self.batches, self.decode_concurrent_ms) /
                     np.interp(batch, self.batches, self.decode_alone_ms))

    def inline_s(self, tokens: int, batch: int, beside_prefill: bool) -> float:
        """A mixed step's prompt work. Beside a prefill batch it gets what the prefill worker leaves of the GPU's
        prompt rate (at least a tenth): the two lanes together never prefill faster than one alone. (`simulate`
        asks for it alone and slows the whole step beside a prefill batch itself.)"""
        rate = self.inline_tok_s
        slower = 1.0
        if beside_prefill:
            beside = max(rate - float(np.interp(batch, self.batches, self.prefill_concurrent_tok_s)), 0.1 * rate)
            rate, slower = beside, rate / beside
        if self.graph_ms:  # [batch + tokens, padded] less [batch] (the decode step's own): the prompt's share
            if not tokens:
                return 0.0  # a decode step alone runs in a decode graph: no token bucket
            base = self._graph_step_ms(batch, False) if batch else 0.0
            return max(self._graph_step_ms(batch + tokens, True) - base, 0.0) * 1e-3 * slower
        return tokens / rate

    def prefill_s(self, tokens: int, batch: int) -> float:
        """The prefill worker's time for `tokens` beside a decode batch (alone: as a step with nothing decoding, on
        the whole-graph curve when there is one, which the prefill worker's graphs are too)."""
        if not batch:
            return self.inline_s(tokens, 0, False)
        return tokens / float(np.interp(batch, self.batches, self.prefill_concurrent_tok_s))


@dataclass
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    left: int = 0  # prompt tokens not yet computed
    in_flight: bool = False  # a chunk of its prompt is in a batch not yet finished (as the engine, one at a time)
    first_token_s: float | None = None
    finish_s: float | None = None
    produced: int = 0

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float:
        return 0.0 if self.output_len <= 1 else (self.finish_s - self.first_token_s) * 1e3 / (self.output_len - 1)


class _Lane:
    """One executor in simulated time: `end` is None while idle; `chunks` the prompt work of its current batch."""

    def __init__(self):
        self.end: float | None = None
        self.start = 0.0
        self.chunks: list[tuple[SimRequest, int, bool]] = []
        self.queued: list[tuple[SimRequest, int, bool]] = []  # the decode lane: prompt work for its next step
        self.queued_limit = math.inf  # the decode lane: the prompt tokens every batch queued there was planned in
        self.batch: list[SimRequest] = []  # the decode lane: the requests its running step advances
        self.beside: bool | str = False  # the decode lane: the prefill worker whose batch ran during its running step
        self.after_mixed = False  # the decode lane: its step before the running one carried a chunk
        self.work_ms = 0.0  # the decode lane: its running step's work left, in ms at its speed alone
        self.rate = 1.0  # the decode lane: that work's progress per ms now (slower beside a prefill batch)
        self.t_last = 0.0  # the decode lane: when work_ms was last brought up to date
        self.lane = PREFILL  # the prefill side: the worker running its current batch


@dataclass
class SimRun:
    requests: list[SimRequest]  # in completion order, each with its times
    placed: dict[str, int]  # prompt tokens per lane
    # as the engine's Stats.device_time: per kind of step or batch ("decode", "mixed", "inline" (a chunk with nothing
    # decoding), "prefill", "prefill2"), [how many, seconds busy]
    device_time: dict[str, list] = field(default_factory=dict)

    def attainment(self, ttft_ms: float, tpot_ms: float) -> float:
        """Share of requests meeting both SLOs."""
        ok = sum(r.ttft_ms <= ttft_ms and r.tpot_ms <= tpot_ms for r in self.requests)
        return ok / len(self.requests) if self.requests else 1.0


def simulate(trace: list[tuple[float, int, int]], policy, timings: StepTimings, max_budget: int = 8192,
             max_num_seqs: int = 1024, second: StepTimings | None = None,
             chunk_every_other_step: bool = False, noise: float = 0.0, seed: int = 0,
             mps_step_ms: float = 0.0) -> SimRun:
    """Run (arrival_s, prompt_len, output_len) requests to completion. `timings`: the prefill worker's split (and
    the decode step alone, mixed steps); `second`: the second prefill worker's split, if the engine has one.
    `chunk_every_other_step`: the engine before 6bf67b2 (session 20's GPU runs), whose decode worker had launched its
    next step before a chunk came back, so that the step after a mixed step never carried a chunk. `noise`: every
    step's and prefill batch's time is scaled by a random factor of that spread (lognormal sigma, mean 1; drawn with
    `seed`), as the GPU's timings vary from step to step; 0: the recorded times exactly. `mps_step_ms`: what a step
    with prompt tokens costs more under MPS, a mixed step or a prefill batch with nothing decoding, whose recorded
    costs come from one process without MPS (rapid's processes: H200_8B_MPS_PROMPT_STEP_MS; hybrid: 0)."""
    rng = random.Random(seed)

    def jitter(x: float) -> float:
        return x * math.exp(rng.gauss(-noise * noise / 2, noise)) if noise else x
    workers = {PREFILL: timings, PREFILL2: second}
    pending = deque(SimRequest(a, p, o, left=p) for a, p, o in sorted(trace))
    done: list[SimRequest] = []
    waiting: deque[SimRequest] = deque()
    decoding: list[SimRequest] = []
    dec, pre = _Lane(), _Lane()
    now, step_ms = 0.0, None
    placed = {DECODE: 0, PREFILL: 0} | ({PREFILL2: 0} if second else {})
    device: dict[str, list] = {}

    def busy(kind: str, start: float) -> None:
        steps, seconds = device.get(kind, (0, 0.0))
        device[kind] = [steps + 1, seconds + now - start]

    def take(budget: int) -> list[tuple[SimRequest, int, bool]]:
        """(request, tokens, last chunk of its prompt) in arrival order, up to `budget` tokens; a request whose
        previous chunk is still in a batch is skipped."""
        chunks = []
        for r in list(waiting):
            if budget <= 0 or len(decoding) + len(chunks) >= max_num_seqs:
                break
            if r.in_flight:
                continue
            n = min(r.left, budget)
            budget -= n
            r.left -= n
            r.in_flight = True
            chunks.append((r, n, r.left == 0))
            if r.left == 0:
                waiting.remove(r)
        return chunks

    def progress(t: float) -> None:
        """Bring the running decode step's work left up to time t, at the speed it had since the last update."""
        if dec.end is not None:
            dec.work_ms -= (t - dec.t_last) * 1e3 * dec.rate
            dec.t_last = t

    def retime() -> None:
        """The prefill side started or ended a batch (or a step started): the running step's speed and end now.
        Beside a prefill batch a step runs at (its time alone / its time concurrent, as recorded at that split)."""
        if dec.end is None:
            return
        dec.rate = 1.0 if pre.end is None else 1.0 / workers[pre.lane].decode_slowdown(len(dec.batch))
        dec.beside = dec.beside or (pre.lane if pre.end is not None else False)  # the prefill worker it ran beside
        dec.end = dec.t_last + max(dec.work_ms, 0.0) / dec.rate * 1e-3

    def prompts_done(chunks, t: float) -> None:
        for r, _, last in chunks:
            r.in_flight = False
            if last:
                r.first_token_s, r.produced = t, 1
                if r.output_len <= 1:
                    r.finish_s = t
                    done.append(r)
                else:
                    decoding.append(r)

    while True:
        while pending and pending[0].arrival_s <= now:
            waiting.append(pending.popleft())
        queued = [r for r in waiting if not r.in_flight]
        if queued:  # the engine asks as prompts arrive and steps end
            room, in_next = max_budget - len(decoding), sum(c[1] for c in dec.queued)
            load = Load(len(decoding), sum(r.left for r in queued), now - queued[0].arrival_s, step_ms,
                        pre.end is not None, mixed_step_room=room,
                        decode_lane_busy=in_next >= min(room, dec.queued_limit))
            d = policy.place(load)
            if d.lane == DECODE:  # joins the decode executor's next step, inside every queued batch's plan (the
                # decode worker runs queued batches in one step: rapid.worker.decode_loop.DecodeLoop._take_inline)
                cap = min(d.token_budget or room, room)  # what this answer takes; the step's size if it bounds it
                limit = min(cap if d.bounds_step else room, dec.queued_limit)
                more = take(min(cap, limit - in_next))
                if more:
                    dec.queued, dec.queued_limit = dec.queued + more, limit
                    placed[DECODE] += sum(c[1] for c in more)
            elif d.lane in PREFILL_LANES and pre.end is None:
                if workers[d.lane] is None:
                    raise ValueError(f"the policy placed a batch on {d.lane!r}, which has no timings here")
                pre.chunks, pre.lane = take(min(d.token_budget or max_budget, max_budget)), d.lane
                placed[d.lane] += sum(c[1] for c in pre.chunks)
                if pre.chunks:
                    tokens = sum(c[1] for c in pre.chunks)
                    progress(now)
                    alone_tax = 0.0 if decoding else mps_step_ms * 1e-3  # (beside decodes: recorded under MPS)
                    batch_s = workers[d.lane].prefill_s(tokens, len(decoding)) + alone_tax
                    pre.start, pre.end = now, now + jitter(batch_s)
                    retime()
        if dec.end is None and (decoding or dec.queued):
            launched_ahead = chunk_every_other_step and decoding and dec.after_mixed
            dec.chunks, dec.queued = ([], dec.queued) if launched_ahead else (dec.queued, [])
            dec.queued_limit = dec.queued_limit if dec.queued else math.inf
            dec.after_mixed = bool(dec.chunks)
            inline = sum(c[1] for c in dec.chunks)
            context = sum(r.prompt_len + r.produced for r in decoding)
            prompt_ms = timings.inline_s(inline, len(decoding), False) * 1e3 + (mps_step_ms if inline else 0.0)
            work_ms = jitter((timings.decode_ms(len(decoding), False, context) if decoding else 0.0) +
                             prompt_ms)  # at its speed alone
            dec.batch, dec.start, dec.beside, dec.work_ms, dec.t_last, dec.end = list(decoding), now, False, work_ms, \
                now, now
            retime()
        upcoming = [t for t in (dec.end, pre.end, pending[0].arrival_s if pending else None) if t is not None]
        if not upcoming:
            return SimRun(done, placed, device)
        now = max(now, min(upcoming))
        progress(now)
        if pre.end is not None and pre.end <= now:
            policy.observe_prefill(pre.lane, sum(c[1] for c in pre.chunks), now - pre.start, len(decoding))
            busy(pre.lane, pre.start)
            prompts_done(pre.chunks, now)
            pre.chunks, pre.end = [], None
            retime()
        if dec.end is not None and dec.end <= now + 1e-12:
            busy("mixed" if dec.chunks and dec.batch else "inline" if dec.chunks else "decode", dec.start)
            if dec.chunks:
                policy.observe_prefill(DECODE, sum(c[1] for c in dec.chunks), now - dec.start, len(dec.batch),
                                       beside_prefill=dec.beside)
            if dec.batch:
                period = (now - dec.start) * 1e3
                step_ms = ewma(step_ms, period)  # the decode step period the engine's scheduler reports
                policy.observe_decode_step(period, beside_prefill=dec.beside, mixed=bool(dec.chunks))
            for r in dec.batch:
                r.produced += 1
                if r.produced >= r.output_len:
                    r.finish_s = now
                    decoding.remove(r)
                    done.append(r)
                    policy.observe_finished(r.output_len)
            prompts_done(dec.chunks, now)
            dec.chunks, dec.end, dec.batch = [], None, []


def sim_trace(requests, rate: float, burstiness: float = 1.0, seed: int = 0,
              max_tokens_cap: int | None = None) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_len, output_len) of benchmark requests (rapid.bench.datasets) at `rate` req/s; outputs
    capped at `max_tokens_cap` as `rapid bench serve --max-tokens-cap` caps them."""
    from rapid.bench.arrivals import arrival_times

    times = arrival_times(len(requests), rate, burstiness, seed)
    cap = max_tokens_cap or max((r.output_len for r in requests), default=0)
    return [(float(t), r.prompt_len, min(r.output_len, cap)) for t, r in zip(times, requests)]

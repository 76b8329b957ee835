"""The adaptive placement policy of mode 'rapid': per prefill batch, hybrid batching or concurrent prefill.

Before each prefill batch the policy reads the load (decode batch, queued prompt tokens, the oldest wait, the
decode step period) against the user's SLOs and answers a lane and a token budget. It learns the costs it
compares from the engine's own timings as they arrive (`StepCosts`): the decode step alone, a prompt token's
cost inside a mixed step, the prefill worker's tokens/s, and how long requests' outputs run.

- **Nothing decodes**: the lane that has prefilled more cheaply per token (inline and the first prefill worker are
  each tried once: inline needs no hand-off between processes, a prefill worker runs beside the decodes).
- **Something decodes**: a prefill worker where it costs the running decodes clearly less per prompt token
  (at most CHEAPER of a mixed step's cost), else hybrid batching, with a TPOT SLO as without. (Until session 19 a
  TPOT SLO also kept a prefill worker at equal cost, for a lower TPOT tail measured in session 14; that hybrid
  stalled on its host, and with whole-graph mixed steps its TPOT p99 was the lower in every run since:
  bench/results/session18-19. Simulated on the H200's recording as the engine runs now, the tie rule put up to 99%
  of the prompts on the prefill worker and fell up to 0.16 below hybrid at 300 ms / 15 ms.) With a second
  prefill worker (at a restricted MPS share: the spatial lever) each prefill worker's cost is learned apart; the
  fastest is used unless a slower one is clearly cheaper for the decodes and keeps the queue inside the TTFT SLO
  (on the H200 a 50% share is not: bench/results/frontier-h200.md). Both costs are measured: a mixed step stalls
  the decodes for its prompt work (its marginal time per prompt token, learned from mixed steps only: a step with
  nothing decoding carries the step's fixed cost); the prefill worker slows every decode step it runs beside (on
  the H200 at MPS 100/100 from 5.6 to 25 ms at batch 16, bench/results/frontier-h200.md), summed over a batch and
  divided by its tokens. Once the prefill worker's cost is known a few small mixed steps measure theirs (then a few
  small batches each other prefill worker's), and another lane is sampled again with a small batch after
  REEXPLORE_EVERY placements, an interval that doubles after each sample (up to REEXPLORE_MAX) while the cheapest
  lane stays the same and falls back to REEXPLORE_EVERY when it changes. Until a mixed step's and a prefill
  worker's costs are measured the earlier rule holds: inline when it is predicted to give the chunk its first token
  sooner (it joins the decode executor's next step, after the running one ends) than the prefill worker (after its
  running batch, if any), only while the decode step period plus the chunk's stall, spread over an output's tokens,
  stays inside the TPOT SLO (TPOT is an average per request), and only while the prefill worker would not meet half
  the TTFT SLO anyway.

Plain Python (no torch): the same object runs in the engine core and in rapid.bench.simulate.
"""

from __future__ import annotations

from rapid.core.placement import (
    DECODE, PREFILL, PREFILL2, AtomPlacement, Load, Placement, StaticPlacement, ewma, lane_free,
    placement_for_mode,
)

TPOT_MARGIN = 0.8  # plan decode steps to at most this share of the TPOT SLO
TTFT_MARGIN = 0.8  # a prefill worker keeps the queue inside the TTFT SLO when it would prefill it within this share
TTFT_RELAXED = 0.5  # the prefill worker gives a first token within this share of the TTFT SLO: no mixed step
CHEAPER = 0.8  # concurrent prefill is "cheaper" for the decodes when it costs them at most this share of inline
DECAY = 0.98  # weight kept by the running sums of the concurrent lane's cost at each new observation
EXPLORE_MIXED = 3  # mixed steps tried (once the concurrent lane's cost is known) to learn what they cost
MIN_BESIDE_BATCHES = 3  # prefill batches beside decodes before the concurrent lane's cost is trusted
REEXPLORE_EVERY = 64  # placements taken on the cheapest lane before another one is sampled (costs drift)
REEXPLORE_MAX = 512  # the interval doubles after each sample while the cheapest lane stays the same, up to this
SMALL_CHUNK = 512  # prompt tokens of a batch that measures a lane's cost (exploring, or sampling it again)


class StepCosts:
    """Running estimates of what each placement costs, from the timings the workers report."""

    def __init__(self):
        self.decode_alone_ms: float | None = None  # a decode step with no prefill beside it or in it
        self.decode_beside_ms: float | None = None  # a decode step while the prefill worker runs
        # a prompt token's marginal cost inside a mixed step, with the prefill worker idle / running beside it:
        # decayed sums of the steps' extra time (over a decode step) and of their prompt tokens, so that a step
        # weighs by its tokens (an average of per-step ratios let a small step's noise swing it: on the H200 the
        # learned figure read 73 us a token at 44 req/s where that run's mixed steps averaged 25-34)
        self.mixed_extra_ms: dict[bool, float] = {False: 0.0, True: 0.0}
        self.mixed_tokens: dict[bool, float] = {False: 0.0, True: 0.0}
        self.mixed_samples = 0  # mixed steps measured (with the prefill worker idle)
        # a prompt token in a step with nothing decoding (the step's fixed cost included: with short prompts it
        # dwarfs a mixed step's marginal cost, so the two are learned apart)
        self.idle_inline_ms_per_token: float | None = None
        self.prefill_rates: dict[str, float] = {}  # each prefill worker's tokens/s
        self.output_len: float | None = None  # tokens a finished request produced
        # per prefill worker: decode time lost beside it, and the prompt tokens it prefilled meanwhile (decayed sums,
        # one term per prefill batch: the steps beside a batch, one batch on the prefill side at a time, are summed
        # until it ends), and the batches summed
        self.beside_extra_ms: dict[str, float] = {}
        self.beside_tokens: dict[str, float] = {}
        self.beside_batches: dict[str, int] = {}
        self.extra_by_lane_ms: dict[str, float] = {}  # per prefill worker: decode time lost beside its running batch

    @property
    def prefill_tok_s(self) -> float | None:
        """The (full-share) prefill worker's rate."""
        return self.prefill_rates.get(PREFILL)

    def decode_step(self, step_ms: float, beside_prefill: bool | str, mixed: bool = False) -> None:
        """`beside_prefill`: False, or the prefill worker whose batch it ran beside (True: the first one)."""
        if mixed:
            return  # a mixed step's time is the decode part and the prompt part: learned through prefill()
        if beside_prefill:
            self.decode_beside_ms = ewma(self.decode_beside_ms, step_ms)
            if self.decode_alone_ms is not None:
                self._charge_beside(beside_prefill, step_ms, self.decode_alone_ms)
        else:
            self.decode_alone_ms = ewma(self.decode_alone_ms, step_ms)

    def decode_cost_ms_per_token(self, lane: str) -> float | None:
        """What one prompt token costs the running decodes (ms of decode time) on `lane`; None until measured."""
        if lane == DECODE:
            return self.mixed_ms_per_token(False)
        if self.beside_batches.get(lane, 0) < MIN_BESIDE_BATCHES:
            return None
        return self.beside_extra_ms[lane] / self.beside_tokens[lane]

    def finished(self, num_output_tokens: int) -> None:
        self.output_len = ewma(self.output_len, max(num_output_tokens, 1))

    def prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int,
                beside_prefill: bool | str = False) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        if lane != DECODE:
            self.prefill_rates[lane] = ewma(self.prefill_rates.get(lane), tokens / seconds)
            extra = self.extra_by_lane_ms.pop(lane, 0.0)
            if num_decoding and self.decode_alone_ms is not None:  # its cost needs the decode step alone
                self.beside_extra_ms[lane] = DECAY * self.beside_extra_ms.get(lane, 0.0) + extra
                self.beside_tokens[lane] = DECAY * self.beside_tokens.get(lane, 0.0) + tokens
                self.beside_batches[lane] = self.beside_batches.get(lane, 0) + 1
            return
        if not num_decoding:
            self.idle_inline_ms_per_token = ewma(self.idle_inline_ms_per_token, seconds * 1e3 / tokens)
            return
        # a mixed step beside a batch is charged as a decode step there is (until session 23 only decode steps were:
        # with ShareGPT-like prompts at 44 req/s on the H200 mixed steps took 43% of the decode executor's time)
        per_token = self.mixed_ms_per_token(False)
        if beside_prefill and self.decode_alone_ms is not None and per_token is not None:
            self._charge_beside(beside_prefill, seconds * 1e3, self.decode_alone_ms + tokens * per_token)
        beside_prefill = bool(beside_prefill)
        decode = self.decode_beside_ms if beside_prefill else self.decode_alone_ms
        # the memory of the prefill workers' costs (DECAY), not of the step averages (EWMA_WEIGHT, about five steps):
        # with that one the figure the lanes are compared by swung with the last few mixed steps (learned on the H200
        # at 5.5-58 us a token over sessions 19-22, where hybrid's mixed steps cost 27 on the device: session 22), and
        # a high swing sent the prompts to the prefill worker until the next sample, REEXPLORE_EVERY placements later
        self.mixed_extra_ms[beside_prefill] = DECAY * self.mixed_extra_ms[beside_prefill] + max(
            seconds * 1e3 - (decode or 0.0), 0.0)
        self.mixed_tokens[beside_prefill] = DECAY * self.mixed_tokens[beside_prefill] + tokens
        self.mixed_samples += not beside_prefill

    def _charge_beside(self, beside_prefill: bool | str, step_ms: float, alone_ms: float) -> None:
        """A step that ran beside a prefill worker's batch (True: the first worker's): its time over the same step
        alone is decode time that batch cost, charged to that worker's next answered batch."""
        lane = PREFILL if beside_prefill is True else beside_prefill
        self.extra_by_lane_ms[lane] = self.extra_by_lane_ms.get(lane, 0.0) + max(step_ms - alone_ms, 0.0)

    def mixed_ms_per_token(self, beside_prefill: bool) -> float | None:
        """A prompt token's marginal cost in a mixed step (None until one was measured)."""
        tokens = self.mixed_tokens[beside_prefill]
        return self.mixed_extra_ms[beside_prefill] / tokens if tokens else None

    def inline_ms(self, beside_prefill: bool) -> float | None:
        """A prompt token's cost in a mixed step now; beside a prefill batch, until measured there, the idle figure."""
        known = self.mixed_ms_per_token(beside_prefill)
        return known if known is not None else self.mixed_ms_per_token(False)


class AdaptivePlacement:
    name = "adaptive"
    reads_load = True

    def __init__(self, max_budget: int, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 prefill_lanes: tuple[str, ...] = (PREFILL,)):
        """`prefill_lanes`: the prefill workers, (PREFILL,), or (PREFILL, PREFILL2) with a second one at its share."""
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        if not prefill_lanes or not set(prefill_lanes) <= {PREFILL, PREFILL2} or prefill_lanes[0] != PREFILL:
            raise ValueError(f"prefill_lanes must be ({PREFILL!r},) or ({PREFILL!r}, {PREFILL2!r}), "
                             f"got {prefill_lanes!r}")
        self.max_budget = max_budget
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.prefill_lanes = tuple(prefill_lanes)
        self.costs = StepCosts()
        self.on_cheaper = 0  # placements on the cheapest lane since another one was last sampled
        self.samples = 0  # other lanes sampled so far (they take turns)
        self.sample_interval = REEXPLORE_EVERY  # placements on the cheapest lane before the next sample
        self.last_best: str | None = None  # the cheapest lane at the last placement that compared them

    def observe_decode_step(self, step_ms: float, beside_prefill: bool | str = False, mixed: bool = False) -> None:
        self.costs.decode_step(step_ms, beside_prefill, mixed)

    def observe_prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int = 0,
                        beside_prefill: bool | str = False) -> None:
        self.costs.prefill(lane, tokens, seconds, num_decoding, beside_prefill)

    def observe_finished(self, num_output_tokens: int) -> None:
        self.costs.finished(num_output_tokens)

    def cost(self, lane: str) -> float | None:
        return self.costs.decode_cost_ms_per_token(lane)

    def learned(self) -> dict[str, float]:
        """The figures the policy decides by, those measured so far: the decode step alone and beside a prefill
        batch (ms), what a prompt token costs the running decodes on each lane (us of decode time), each prefill
        worker's rate (tokens/s), the mean output length (tokens)."""
        c = self.costs
        out = {"decode_alone_ms": c.decode_alone_ms, "decode_beside_ms": c.decode_beside_ms,
               "output_len": c.output_len}
        for lane in (DECODE, *self.prefill_lanes):
            cost = self.cost(lane)
            out[f"decode_us_per_prompt_token:{lane}"] = None if cost is None else cost * 1e3
        out.update({f"prefill_tok_s:{lane}": rate for lane, rate in c.prefill_rates.items()})
        return {k: round(v, 3) for k, v in out.items() if v is not None}

    def idle_lane(self) -> str:
        """Nothing decodes: the lane whose learned cost per prompt token is lower; each is tried once first."""
        c = self.costs
        inline = c.idle_inline_ms_per_token
        if inline is None:
            return DECODE
        if not c.prefill_rates:
            return PREFILL
        fastest = max(c.prefill_rates, key=c.prefill_rates.get)
        return DECODE if inline <= 1e3 / c.prefill_rates[fastest] else fastest

    def in_time(self, load: Load, lane: str) -> bool:
        """The prefill worker `lane` would give the whole queue its first tokens within the TTFT SLO (always true
        without an SLO or before its rate is known)."""
        rate = self.costs.prefill_rates.get(lane)
        if self.slo_ttft_ms is None or rate is None:
            return True
        return load.oldest_wait_s * 1e3 + load.queued_tokens / rate * 1e3 <= TTFT_MARGIN * self.slo_ttft_ms

    def prefill_lane(self, load: Load) -> str:
        """The prefill worker for a batch: one not yet measured beside decodes first; then the fastest, unless a
        slower one costs the decodes clearly less per prompt token (at most CHEAPER of it) and keeps the queue inside
        the TTFT SLO (a slower worker pays in TTFT what it saves the decodes)."""
        unmeasured = [lane for lane in self.prefill_lanes if self.cost(lane) is None]
        if unmeasured and load.num_decoding:
            return unmeasured[0]
        rates = self.costs.prefill_rates
        fastest = max(self.prefill_lanes, key=lambda lane: rates.get(lane, 0.0))
        if self.cost(fastest) is None:
            return fastest
        cheaper = [lane for lane in self.prefill_lanes if self.cost(lane) is not None
                   and self.cost(lane) <= CHEAPER * self.cost(fastest) and self.in_time(load, lane)]
        return min(cheaper, key=self.cost, default=fastest)

    def cheapest_lane(self, load: Load) -> str | None:
        """A prefill worker where it costs the running decodes clearly less per prompt token than a mixed step, else
        hybrid batching (the simpler of the two, and the fallback where concurrency does not pay); None: not
        measured."""
        inline = self.cost(DECODE)
        if inline is None or all(self.cost(lane) is None for lane in self.prefill_lanes):
            return None
        lane = self.prefill_lane(load)
        if self.cost(lane) is None:  # a worker still to be measured: compare the ones that are
            lane = min((x for x in self.prefill_lanes if self.cost(x) is not None), key=self.cost)
        return lane if self.cost(lane) <= CHEAPER * inline else DECODE

    def exploring(self, load: Load, chunk: int) -> Placement | None:
        """A placement that measures a lane not yet measured beside decodes, once one prefill worker's cost is known:
        a few small mixed steps, then each other prefill worker."""
        if not any(self.cost(lane) is not None for lane in self.prefill_lanes):
            return None  # the earlier rule measures the first prefill worker
        if chunk > 0 and self.costs.mixed_samples < EXPLORE_MIXED and not load.prefill_lane_busy:
            return Placement(DECODE, min(chunk, SMALL_CHUNK), "mixed step: measuring its cost beside decodes",
                             bounds_step=True)
        unmeasured = [lane for lane in self.prefill_lanes if self.cost(lane) is None]
        if unmeasured and not load.prefill_lane_busy:
            return Placement(unmeasured[0], min(self.max_budget, SMALL_CHUNK), "concurrent: measuring its cost beside "
                             "decodes")
        return None

    def sample_other(self, best: str, chunk: int, load: Load) -> str | None:
        """One of the other lanes, in turn (costs drift with the load), sample_interval placements after the last
        sample; None while that lane is busy (the sample waits for it)."""
        others = [lane for lane in (DECODE, *self.prefill_lanes) if lane != best and (lane != DECODE or chunk > 0)]
        if not others:
            return None
        other = others[(self.samples + 1) % len(others)]
        if not lane_free(load, other):
            return None
        self.samples += 1
        self.on_cheaper = 0
        self.sample_interval = min(2 * self.sample_interval, REEXPLORE_MAX)
        return other

    def note_best(self, best: str) -> None:
        """A change of the cheapest lane starts the sampling interval again: the costs moved, so sample them sooner
        (each sample beside decodes lengthens their steps: on the H200 samples every 64 placements were about 40% of
        adaptive's decode-step excess over hybrid's, bench/results/session27)."""
        if best != self.last_best and self.sample_interval > REEXPLORE_EVERY:  # (at 64 already: keep counting, or
            self.sample_interval, self.on_cheaper = REEXPLORE_EVERY, 0  # lanes that alternate would never sample)
        self.last_best = best

    def fits_tpot(self, load: Load, chunk: int) -> bool:
        """The chunk's stall in the next decode step, spread over an output's tokens, keeps the step period inside
        the TPOT SLO (always, without one)."""
        c = self.costs
        per_token = c.inline_ms(load.prefill_lane_busy)
        if self.slo_tpot_ms is None:
            return True
        if per_token is None or load.decode_step_ms is None:
            return False
        return load.decode_step_ms + chunk * per_token / (c.output_len or 1.0) <= TPOT_MARGIN * self.slo_tpot_ms

    def inline_ttft_ms(self, load: Load, chunk: int) -> float | None:
        """The chunk's first token if it joins the next decode step; None when that would break the TPOT SLO
        (or no SLO, or costs not learned yet)."""
        per_token = self.costs.inline_ms(load.prefill_lane_busy)
        if self.slo_tpot_ms is None or not self.fits_tpot(load, chunk):
            return None
        return load.decode_step_ms / 2 + load.decode_step_ms + chunk * per_token  # the running step ends first

    def concurrent_ttft_ms(self, load: Load, chunk: int) -> float | None:
        """The chunk's first token on the fastest prefill worker (None before a rate is known)."""
        rate = max(self.costs.prefill_rates.values(), default=None)
        if rate is None:
            return None
        ahead = chunk / rate * 1e3 / 2 if load.prefill_lane_busy else 0.0  # about half a batch still running
        return ahead + chunk / rate * 1e3

    def place(self, load: Load) -> Placement:
        if load.num_decoding == 0:
            return Placement(self.idle_lane(), self.max_budget, "decode idle")
        chunk = min(load.queued_tokens, self.max_budget, load.mixed_step_room)
        explore = self.exploring(load, chunk)
        if explore is not None:
            return explore
        best = self.cheapest_lane(load)
        if best is not None:
            # the engine asks before every step, and drops the answer while its lane is busy: count only the
            # placements taken (counting every question sampled the prefill worker every few dozen steps, not every
            # REEXPLORE_EVERY placements: most of the 17-25% of prompt tokens there at 44-52 req/s on the H200 at
            # equal costs, bench/results/session20), and only they say which lane is the cheapest
            if lane_free(load, best) and (best != DECODE or chunk > 0):  # (no chunk: another answer follows)
                self.note_best(best)
                self.on_cheaper += 1
            if self.on_cheaper > self.sample_interval and not load.prefill_lane_busy:  # a sample alone, to measure it
                other = self.sample_other(best, chunk, load)
                if other is not None:
                    budget = min(chunk if other == DECODE else self.max_budget, SMALL_CHUNK)
                    return Placement(other, budget, "measuring its cost again", bounds_step=True)
            if best != DECODE:
                return Placement(best, self.max_budget, "concurrent: cheaper for the decodes")
            if chunk > 0:  # TPOT is an average: the cheaper lane is the better one even when tight
                return Placement(DECODE, chunk, "mixed step: cheaper for the decodes")
        inline = self.inline_ttft_ms(load, chunk) if chunk > 0 else None  # a full step takes no prompt
        if inline is not None:
            beside = self.concurrent_ttft_ms(load, chunk)
            relaxed = (self.slo_ttft_ms is not None and beside is not None
                       and load.oldest_wait_s * 1e3 + beside <= TTFT_RELAXED * self.slo_ttft_ms)
            if (beside is None or inline <= beside) and not relaxed:
                return Placement(DECODE, chunk, "mixed step: sooner first token, inside the TPOT SLO", bounds_step=True)
        return Placement(self.prefill_lane(load), self.max_budget, "concurrent")


def make_placement(config):
    """The policy of an EngineConfig: mode rapid's placement (adaptive, static, the ATOM rule or mixed), else the
    mode's lane."""
    rapid = config.rapid
    if config.mode != "rapid" or rapid.placement == "static":
        return placement_for_mode(config.mode)
    if rapid.placement == "atom":
        return AtomPlacement()
    if rapid.placement == "mixed":
        return StaticPlacement(DECODE)
    lanes = (PREFILL,) if rapid.second_prefill_sm_percentage is None else (PREFILL, PREFILL2)
    return AdaptivePlacement(config.scheduler.max_num_batched_tokens, rapid.slo_ttft_ms, rapid.slo_tpot_ms,
                             prefill_lanes=lanes)

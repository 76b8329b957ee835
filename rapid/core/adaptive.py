"""The adaptive placement policy of mode 'rapid': per prefill batch, hybrid batching or concurrent prefill.

Before each prefill batch the policy reads the load (decode batch, queued prompt tokens, the oldest wait, the
decode step period) against the user's SLOs and answers a lane and a token budget. It learns the costs it
compares from the engine's own timings as they arrive (`StepCosts`): the decode step alone and beside a running
prefill batch, a prompt token's cost inside a mixed step, and the prefill worker's tokens/s.

1. **Inline** (hybrid batching: the chunk joins the decode executor's next step) when nothing decodes (the
   decode executor is idle and has the whole GPU; no hand-off between processes), or, under a TPOT SLO, when
   the mixed step stays inside the SLO and is predicted to give the first token sooner than the prefill worker,
   or when decode steps beside a running prefill would break the SLO anyway.
2. **Concurrent** (the prefill worker, beside the decode steps) otherwise. Its budget follows the decode step
   period against the TPOT SLO (AIMD: halve when over, add a step when well under), except while the oldest
   waiting request is past half the TTFT SLO: then the full budget, since a request that misses TTFT is lost.

Without SLOs it maximises throughput: concurrent prefill with the full budget whenever something decodes
(on the H200 at MPS 100/100 that matched or beat hybrid batching offline and in serving; bench/results/session12).
Plain Python (no torch): the same object runs in the engine core and in rapid.bench.simulate.
"""

from __future__ import annotations

from rapid.core.controller import PrefillBudgetController
from rapid.core.placement import DECODE, PREFILL, Load, Placement, placement_for_mode

TPOT_MARGIN = 0.8  # plan decode steps to at most this share of the TPOT SLO
TTFT_URGENT = 0.5  # the oldest waiter past this share of the TTFT SLO: prefill gets the full budget
EWMA = 0.2  # weight of the newest observation in every cost estimate


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


class StepCosts:
    """Running estimates of what each placement costs, from the timings the workers report."""

    def __init__(self):
        self.decode_alone_ms: float | None = None  # a decode step with no prefill beside it or in it
        self.decode_beside_ms: float | None = None  # a decode step while the prefill worker runs
        self.inline_ms_per_token: float | None = None  # a prompt token inside a mixed (or decode-idle) step
        self.prefill_tok_s: float | None = None  # the prefill worker's rate

    def decode_step(self, step_ms: float, beside_prefill: bool) -> None:
        if beside_prefill:
            self.decode_beside_ms = _ewma(self.decode_beside_ms, step_ms)
        else:
            self.decode_alone_ms = _ewma(self.decode_alone_ms, step_ms)

    def prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        if lane == PREFILL:
            self.prefill_tok_s = _ewma(self.prefill_tok_s, tokens / seconds)
            return
        decode_part = (self.decode_alone_ms or 0.0) if num_decoding else 0.0
        per_token = max(seconds * 1e3 - decode_part, 0.0) / tokens
        self.inline_ms_per_token = _ewma(self.inline_ms_per_token, per_token)


class AdaptivePlacement:
    name = "adaptive"

    def __init__(self, max_budget: int, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 min_budget: int = 256):
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        self.max_budget = max_budget
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.costs = StepCosts()
        self.budget = (PrefillBudgetController(TPOT_MARGIN * slo_tpot_ms, max_budget, min(min_budget, max_budget))
                       if slo_tpot_ms is not None else None)

    def observe_decode_step(self, step_ms: float, beside_prefill: bool = False) -> None:
        self.costs.decode_step(step_ms, beside_prefill)
        if self.budget is not None:
            self.budget.observe_decode_step(step_ms)

    def observe_prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int = 0) -> None:
        self.costs.prefill(lane, tokens, seconds, num_decoding)

    def inline_is_better(self, load: Load) -> bool:
        """Under a TPOT SLO: does the queue's next chunk belong in a mixed step rather than on the prefill worker?"""
        c = self.costs
        if self.slo_tpot_ms is None or c.decode_alone_ms is None or c.inline_ms_per_token is None:
            return False
        limit = TPOT_MARGIN * self.slo_tpot_ms
        chunk = min(load.queued_tokens, self.max_budget)
        mixed_ms = c.decode_alone_ms + chunk * c.inline_ms_per_token
        if mixed_ms > limit:
            return False  # the mixed step itself would break the SLO
        if c.decode_beside_ms is not None and c.decode_beside_ms > limit:
            return True  # decode steps beside a prefill batch break it anyway
        if c.prefill_tok_s is None:
            return False
        inline_ttft = (load.decode_step_ms or c.decode_alone_ms) / 2 + mixed_ms  # the running step ends first
        return inline_ttft <= chunk / c.prefill_tok_s * 1e3

    def place(self, load: Load) -> Placement:
        if load.num_decoding == 0:
            return Placement(DECODE, self.max_budget, "decode idle")
        if self.inline_is_better(load):
            return Placement(DECODE, min(load.queued_tokens, self.max_budget), "mixed step inside the TPOT SLO")
        urgent = (self.slo_ttft_ms is not None and load.oldest_wait_s * 1e3 > TTFT_URGENT * self.slo_ttft_ms)
        if self.budget is None or urgent:
            return Placement(PREFILL, self.max_budget, "TTFT at risk" if urgent else "concurrent")
        return Placement(PREFILL, self.budget.budget, "concurrent, TPOT-bounded")


def make_placement(config):
    """The policy of an EngineConfig: adaptive for mode 'rapid' (unless placement='static'), else the mode's lane."""
    rapid = config.rapid
    if config.mode == "rapid" and rapid.placement == "adaptive":
        return AdaptivePlacement(config.scheduler.max_num_batched_tokens, rapid.slo_ttft_ms, rapid.slo_tpot_ms)
    return placement_for_mode(config.mode)

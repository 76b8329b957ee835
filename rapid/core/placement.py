"""Where prefill work runs: a decision of the one scheduler, asked before each prefill batch is built.

The lanes:
- `DECODE`: the decode executor (the one worker of mode 'hybrid', the decode worker of 'rapid'). Its
  every step runs the resident decodes; prefill chunks placed here join that step (hybrid batching,
  the budget shared with the decodes).
- `PREFILL`: the prefill worker, which runs beside the decode executor (mode 'rapid': the same GPU under
  MPS; 'disagg': another GPU with its own KV pool).
- `PREFILL2`: mode 'rapid' with `second_prefill_sm_percentage`: a second prefill worker at that MPS share (the
  run-time spatial lever). One prefill batch runs on the two prefill workers at a time.

A placement policy is any object with `place(load: Load | None) -> Placement` (None when its `reads_load` is
False),
`observe_decode_step(ms, beside_prefill, mixed)`, `observe_prefill(lane, tokens, seconds, num_decoding)` and
`observe_finished(num_output_tokens)` (the workers' timings and the lengths of completed outputs, as they arrive),
and optionally `learned() -> dict[str, float]` (what it has measured, for the engine's stats);
`StaticPlacement` always answers the same lane, `rapid.core.adaptive.AdaptivePlacement` decides per batch
from the load and the SLOs. Plain Python: no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

logger = logging.getLogger(__name__)

DECODE = "decode"
EWMA_WEIGHT = 0.2  # weight of the newest observation in the running averages of timings
PREFILL = "prefill"
PREFILL2 = "prefill2"
PREFILL_LANES = (PREFILL, PREFILL2)
LANES = (DECODE, PREFILL, PREFILL2)
ATOM_MIN_DECODE_BATCH = 64  # the ATOM rule: prefill on the restricted share while at least this many decode


def ewma(old: float | None, new: float) -> float:
    """Exponentially weighted running average (the first observation starts it)."""
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass(frozen=True)
class Load:
    """What a placement policy sees before a prefill batch is built."""

    num_decoding: int  # the decode batch (requests resident in the decode executor)
    queued_tokens: int  # prompt tokens still to compute (waiting and partly prefilled requests)
    oldest_wait_s: float  # how long the oldest request without a first token has waited
    decode_step_ms: float | None  # recent decode step period (EWMA); None before the first step
    prefill_lane_busy: bool  # a batch is in flight on a prefill worker
    mixed_step_room: int = 1 << 30  # prompt tokens a mixed step can still take (the step budget less the decodes)
    decode_lane_busy: bool = False  # the decode executor holds all the chunks it takes: a DECODE placement waits
    # prompt tokens a prefill worker could take now (None: all queued); less than queued_tokens by the rest of prompts
    # whose chunk is in flight on the decode executor (their next chunk follows it there: rapid.core.in_flight), and by
    # the waiting prompts while none can be admitted
    prefill_queued_tokens: int | None = None


def lane_free(load: Load, lane: str) -> bool:
    """The scheduler would take a batch for `lane` now (one in flight between the prefill workers; the decode
    executor holds rapid.core.in_flight.DECODE_LANE_DEPTH), and a prefill worker would find prompt tokens for it."""
    if lane == DECODE:
        return not load.decode_lane_busy
    return not load.prefill_lane_busy and load.prefill_queued_tokens != 0


@dataclass(frozen=True)
class Placement:
    """A policy's answer: the lane of the next prefill batch and its token budget (None: the scheduler's)."""

    lane: str
    token_budget: int | None = None
    reason: str = ""  # a few words for logs and stats
    # the budget sizes the whole step too (a TPOT-checked or measured size): no later decode-lane batch shares it.
    # Otherwise batches queued on the decode executor share its next step up to the core's token budget.
    bounds_step: bool = False


class ReadsNoTimings:
    """The timing callbacks of a policy that decides without them (StaticPlacement, AtomPlacement)."""

    def observe_decode_step(self, step_ms: float, beside_prefill: bool | str = False, mixed: bool = False) -> None:
        pass

    def observe_prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int = 0,
                        beside_prefill: bool | str = False) -> None:
        pass

    def observe_finished(self, num_output_tokens: int) -> None:
        pass

    def learned(self) -> dict[str, float]:
        """What the policy has learned from the timings (nothing)."""
        return {}


@dataclass(frozen=True)
class StaticPlacement(ReadsNoTimings):
    """Every prefill batch goes to the same lane: DECODE for 'hybrid', PREFILL for 'rapid' and 'disagg'."""

    lane: str
    reads_load: ClassVar[bool] = False  # place() ignores the load: the scheduler need not build it

    def __post_init__(self):
        if self.lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {self.lane!r}")

    @property
    def name(self) -> str:
        return f"static {self.lane}"

    def place(self, load: Load) -> Placement:
        return Placement(self.lane, None, "static")


def placement_for_mode(mode: str) -> StaticPlacement:
    return StaticPlacement(DECODE if mode == "hybrid" else PREFILL)


class AtomPlacement(ReadsNoTimings):
    """The fixed rule of the paper's ROCm ATOM engine, as a baseline: both phases on the whole GPU, unless prefill
    work waits while at least ATOM_MIN_DECODE_BATCH requests decode; then the prefill side is restricted (ATOM splits
    the CUs 50/50; here the second prefill worker's MPS share, with the decode worker keeping its own)."""

    name = "atom"
    reads_load = True

    def place(self, load: Load) -> Placement:
        if load.num_decoding >= ATOM_MIN_DECODE_BATCH:
            return Placement(PREFILL2, None, f"atom: >= {ATOM_MIN_DECODE_BATCH} decoding, prefill restricted")
        return Placement(PREFILL, None, "atom: whole GPU")


class PlacementLog:
    """What the policy decided: prefill batches and tokens per lane, the last decision; logs each change of lane."""

    def __init__(self, policy: str):
        self.policy = policy
        self.batches = dict.fromkeys((DECODE, PREFILL), 0)  # and PREFILL2 once it takes a batch
        self.tokens = dict.fromkeys((DECODE, PREFILL), 0)
        self.reasons: dict[str, int] = {}  # prefill batches by the decision's reason ("lane: reason")
        self.last: Placement | None = None

    def record(self, decision: Placement, batch) -> None:
        """`batch`: the InFlight batch built for the decision (None when nothing could be scheduled)."""
        if batch is None:
            return
        self.batches[decision.lane] = self.batches.get(decision.lane, 0) + 1
        self.tokens[decision.lane] = self.tokens.get(decision.lane, 0) + sum(n for _, n in batch.chunks)
        key = f"{decision.lane}: {decision.reason}"
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if self.last is None or self.last.lane != decision.lane:
            logger.info("prefill placement (%s policy): %s lane (%s)", self.policy, decision.lane, decision.reason)
        self.last = decision

    @property
    def current(self) -> str:
        """'decode', 'prefill' or 'prefill2': the lane of the latest prefill batch ('' before the first)."""
        return self.last.lane if self.last else ""

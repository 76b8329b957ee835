"""Where prefill work runs: a decision of the one scheduler, asked before each prefill batch is built.

Two lanes exist:
- `DECODE`: the decode executor (the one worker of mode 'hybrid', the decode worker of 'rapid'). Its
  every step runs the resident decodes; prefill chunks placed here join that step (hybrid batching,
  the budget shared with the decodes).
- `PREFILL`: the prefill worker, which runs beside the decode executor (mode 'rapid': the same GPU under
  MPS; 'disagg': another GPU with its own KV pool).

A placement policy is any object with `place(load: Load | None) -> Placement` (None when its `reads_load` is
False),
`observe_decode_step(ms, beside_prefill, mixed)`, `observe_prefill(lane, tokens, seconds, num_decoding)` and
`observe_finished(num_output_tokens)` (the workers' timings and the lengths of completed outputs, as they arrive);
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
LANES = (DECODE, PREFILL)


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
    prefill_lane_busy: bool  # a batch is in flight on the prefill worker
    mixed_step_room: int = 1 << 30  # prompt tokens a mixed step can still take (the step budget less the decodes)


@dataclass(frozen=True)
class Placement:
    """A policy's answer: the lane of the next prefill batch and its token budget (None: the scheduler's)."""

    lane: str
    token_budget: int | None = None
    reason: str = ""  # a few words for logs and stats


@dataclass(frozen=True)
class StaticPlacement:
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

    def observe_decode_step(self, step_ms: float, beside_prefill: bool = False, mixed: bool = False) -> None:
        pass

    def observe_prefill(self, lane: str, tokens: int, seconds: float, num_decoding: int = 0,
                        beside_prefill: bool = False) -> None:
        pass

    def observe_finished(self, num_output_tokens: int) -> None:
        pass


def placement_for_mode(mode: str) -> StaticPlacement:
    return StaticPlacement(DECODE if mode == "hybrid" else PREFILL)


class PlacementLog:
    """What the policy decided: prefill batches and tokens per lane, the last decision; logs each change of lane."""

    def __init__(self, policy: str):
        self.policy = policy
        self.batches = dict.fromkeys(LANES, 0)
        self.tokens = dict.fromkeys(LANES, 0)
        self.last: Placement | None = None

    def record(self, decision: Placement, batch) -> None:
        """`batch`: the InFlight batch built for the decision (None when nothing could be scheduled)."""
        if batch is None:
            return
        self.batches[decision.lane] += 1
        self.tokens[decision.lane] += sum(n for _, n in batch.chunks)
        if self.last is None or self.last.lane != decision.lane:
            logger.info("prefill placement (%s policy): %s lane (%s)", self.policy, decision.lane, decision.reason)
        self.last = decision

    @property
    def current(self) -> str:
        """'decode' or 'prefill': the lane of the latest prefill batch ('' before the first)."""
        return self.last.lane if self.last else ""

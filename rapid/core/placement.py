"""Where prefill work runs: a decision of the one scheduler, asked before each prefill batch is built.

Two lanes exist:
- `DECODE`: the decode executor (the one worker of mode 'hybrid', the decode worker of 'rapid'). Its
  every step runs the resident decodes; prefill chunks placed here join that step (hybrid batching,
  the budget shared with the decodes).
- `PREFILL`: the prefill worker, which runs beside the decode executor (mode 'rapid': the same GPU under
  MPS; 'disagg': another GPU with its own KV pool).

A placement policy is any object with `prefill_lane(scheduler) -> str`; the adaptive resource manager
swaps in its own, per step. Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE = "decode"
PREFILL = "prefill"
LANES = (DECODE, PREFILL)


@dataclass(frozen=True)
class StaticPlacement:
    """Every prefill batch goes to the same lane: DECODE for 'hybrid', PREFILL for 'rapid' and 'disagg'."""

    lane: str

    def __post_init__(self):
        if self.lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {self.lane!r}")

    def prefill_lane(self, scheduler) -> str:
        return self.lane


def placement_for_mode(mode: str) -> StaticPlacement:
    return StaticPlacement(DECODE if mode == "hybrid" else PREFILL)

"""Adaptive resource management: policies that choose how much compute prefill gets.

Two policies, both plain Python and testable on recorded timings without a GPU:

- `FrontierPlanner` (between runs): from a measured frontier (`rapid bench frontier` JSON), pick the
  operating point (hybrid chunk or rapid MPS split) with the most prefill tokens/s whose TPOT stays
  under the SLO at a given decode batch, or report that none does. This is where the spatial lever
  (the MPS percentage, fixed per worker process) is chosen.
- `PrefillBudgetController` (at run time, in the rapid core): the temporal lever. It keeps an EWMA of
  the decode step time and shrinks the prefill token budget per launch when decode runs over its
  TPOT target, and grows it back when decode has room (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OperatingPoint:
    mode: str  # "hybrid" or "rapid"
    setting: str  # "chunk 512" or "MPS 60/40"
    batch: int
    tpot_mean_ms: float
    tpot_p90_ms: float
    prefill_tok_s: float


class FrontierPlanner:
    def __init__(self, points: list[OperatingPoint]):
        if not points:
            raise ValueError("the frontier has no points")
        self.points = points

    @classmethod
    def from_json(cls, path: str | Path) -> "FrontierPlanner":
        data = json.loads(Path(path).read_text())
        rows = data["points"] if isinstance(data, dict) else data
        pts = []
        for r in rows:
            if r.get("tpot_mean_ms") is None:
                continue
            setting = f"chunk {r['chunk']}" if r["mode"] == "hybrid" else f"MPS {r['split']}"
            pts.append(OperatingPoint(r["mode"], setting, r["batch"], r["tpot_mean_ms"], r["tpot_p90_ms"],
                                      r["prefill_tok_s"]))
        return cls(pts)

    def best(self, batch: int, tpot_slo_ms: float, modes: tuple[str, ...] = ("hybrid", "rapid")) -> OperatingPoint | None:
        """The highest-prefill point meeting the SLO by p90 TPOT, at the measured batch nearest `batch`
        (rounding up: a larger batch is the safe side); None when no point meets the SLO."""
        batches = sorted({p.batch for p in self.points})
        at = next((b for b in batches if b >= batch), batches[-1])
        ok = [p for p in self.points if p.batch == at and p.mode in modes and p.tpot_p90_ms <= tpot_slo_ms]
        return max(ok, key=lambda p: p.prefill_tok_s, default=None)

    def gain(self, batch: int, tpot_slo_ms: float) -> float | None:
        """Prefill throughput of the best rapid point over the best hybrid point under the same SLO."""
        r, h = self.best(batch, tpot_slo_ms, ("rapid",)), self.best(batch, tpot_slo_ms, ("hybrid",))
        if r is None or h is None:
            return None
        return r.prefill_tok_s / h.prefill_tok_s


class PrefillBudgetController:
    """AIMD on the prefill tokens per launch, driven by decode step times against a TPOT target."""

    def __init__(self, tpot_target_ms: float, max_budget: int, min_budget: int = 256, step: int = 256,
                 alpha: float = 0.2, low_water: float = 0.75):
        if tpot_target_ms <= 0:
            raise ValueError(f"tpot_target_ms must be > 0, got {tpot_target_ms}")
        if not 0 < min_budget <= max_budget:
            raise ValueError(f"need 0 < min_budget ({min_budget}) <= max_budget ({max_budget})")
        self.target = tpot_target_ms
        self.min_budget, self.max_budget, self.step = min_budget, max_budget, step
        self.alpha, self.low_water = alpha, low_water
        self.budget = max_budget
        self.ewma_ms: float | None = None

    def observe_decode_step(self, step_ms: float) -> int:
        """Feed one decode step time; return the prefill token budget for the next launch."""
        self.ewma_ms = step_ms if self.ewma_ms is None else (1 - self.alpha) * self.ewma_ms + self.alpha * step_ms
        if self.ewma_ms > self.target:
            self.budget = max(self.min_budget, self.budget // 2)
        elif self.ewma_ms < self.low_water * self.target:
            self.budget = min(self.max_budget, self.budget + self.step)
        return self.budget

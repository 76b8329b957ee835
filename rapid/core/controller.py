"""Adaptive resource management: policies that choose how much compute prefill gets.

`FrontierPlanner` (between runs): from a measured frontier (`rapid bench frontier` JSON), pick the
operating point (hybrid chunk or rapid MPS split) with the most prefill tokens/s whose TPOT stays under
the SLO at a given decode batch, or report that none does. This is where the spatial lever (the MPS
percentage, fixed per worker process) is chosen. The run-time policy is rapid.core.adaptive.
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

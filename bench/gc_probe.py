"""The garbage collector during `rapid bench offline`: every collection's generation, start and duration, and what
the first full collections of the run traversed (object types outside the frozen start-up heap).

    python3 bench/gc_probe.py --out $OUT -- --model /tmp/llama8b --load-format dummy --skip-tokenizer-init ...

Everything after `--` goes to `rapid bench offline`. Writes gc-probe.json into --out.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
from pathlib import Path


class CollectionLog:
    """gc.callbacks hook: (generation, start, seconds, collected) per collection; object types at full ones."""

    def __init__(self, census_limit: int = 3, census_min_s: float = 0.01):
        self.collections: list[tuple[int, float, float, int]] = []
        self.census: list[dict] = []
        self.census_limit = census_limit
        self.census_min_s = census_min_s  # full collections at least this long get a census (the run's, not start-up's)
        self._start = 0.0
        self.thresholds_frozen: tuple[int, ...] | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        if gc.get_freeze_count() and self.thresholds_frozen is None:
            self.thresholds_frozen = gc.get_threshold()  # what the engine set with its freeze (restored at the end)
        self.collections.append((info["generation"], self._start, took, info["collected"]))
        if (info["generation"] == 2 and gc.get_freeze_count() and took > self.census_min_s
                and len(self.census) < self.census_limit):
            objs = gc.get_objects(generation=2)
            types = collections.Counter(type(o).__qualname__ for o in objs)
            self.census.append({"at": self._start, "ms": round(took * 1e3, 2), "objects": len(objs),
                                "frozen": gc.get_freeze_count(), "top_types": types.most_common(20)})

    def summary(self, t0: float, t1: float) -> dict:
        out = {}
        for gen in (0, 1, 2):
            ms = sorted(took * 1e3 for g, start, took, _ in self.collections if g == gen and t0 <= start <= t1)
            out[f"gen{gen}"] = {"collections": len(ms), "total_ms": round(sum(ms), 1),
                                "max_ms": round(ms[-1], 2) if ms else 0.0, "largest_ms": [round(x, 1) for x in ms[-8:]]}
        starts = [start for g, start, _, _ in self.collections if g == 2 and t0 <= start <= t1]
        out["gen2_interval_s"] = [round(b - a, 2) for a, b in zip(starts, starts[1:])][:20]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--census-min-ms", type=float, default=10.0, help="census of full collections at least this long")
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    from rapid.entrypoints.cli import main as rapid_main

    log = CollectionLog(census_min_s=args.census_min_ms / 1e3)
    gc.callbacks.append(log)
    t0 = time.perf_counter()
    try:
        rapid_main(["bench", "offline", *rest])
    finally:
        gc.callbacks.remove(log)
    t1 = time.perf_counter()
    report = {"command": "python3 bench/gc_probe.py " + " ".join(sys.argv[1:]), "python": sys.version.split()[0],
              "thresholds_default": gc.get_threshold(), "thresholds_while_frozen": log.thresholds_frozen,
              "whole_command": log.summary(t0, t1),
              "census_at_full_collections": [dict(c, at=round(c["at"] - t0, 2)) for c in log.census]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gc-probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["whole_command"], indent=1))
    for c in report["census_at_full_collections"]:
        print(f"full collection at {c['at']} s: {c['ms']} ms over {c['objects']} objects; {c['top_types'][:10]}")


if __name__ == "__main__":
    main()

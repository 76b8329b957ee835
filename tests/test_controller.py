"""Adaptive resource management on recorded timings (no GPU)."""

import json
from pathlib import Path

import pytest

from rapid.core.controller import FrontierPlanner, OperatingPoint

ROOT = Path(__file__).resolve().parents[1]

# Points as measured on the H100 (bench/results/frontier-h100.json, batch 64).
H100_B64 = [
    OperatingPoint("hybrid", "chunk 256", 64, 21.7, 23.1, 11782),
    OperatingPoint("hybrid", "chunk 512", 64, 30.6, 33.1, 16755),
    OperatingPoint("hybrid", "chunk 1024", 64, 50.0, 52.4, 20472),
    OperatingPoint("rapid", "MPS 50/50", 64, 19.8, 20.4, 16342),
    OperatingPoint("rapid", "MPS 60/40", 64, 20.0, 20.7, 20472),
    OperatingPoint("rapid", "MPS 70/30", 64, 24.4, 25.2, 23254),
]


def test_planner_picks_the_most_prefill_under_the_slo():
    planner = FrontierPlanner(H100_B64)
    assert planner.best(64, 25.0).setting == "MPS 60/40"
    assert planner.best(64, 26.0).setting == "MPS 70/30"
    assert planner.best(64, 60.0, ("hybrid",)).setting == "chunk 1024"
    assert planner.best(64, 10.0) is None  # nothing meets a TPOT below decode-alone
    assert planner.best(40, 25.0).batch == 64  # rounds the batch up to a measured one
    # under a 25 ms TPOT SLO rapid gives 20472 / 11782 = 1.74x the prefill throughput of hybrid
    assert planner.gain(64, 25.0) == pytest.approx(20472 / 11782)
    assert planner.gain(64, 21.0) is None  # hybrid has no point that fast


def test_planner_reads_a_frontier_file_and_skips_unmeasured_points(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"points": [
        {"mode": "hybrid", "chunk": 256, "batch": 16, "tpot_mean_ms": 17.5, "tpot_p90_ms": 22.2, "prefill_tok_s": 14634},
        {"mode": "rapid", "split": "80/40", "batch": 16, "tpot_mean_ms": 16.7, "tpot_p90_ms": 17.6, "prefill_tok_s": 24490},
        {"mode": "rapid", "split": "x", "batch": 16, "tpot_mean_ms": None, "tpot_p90_ms": None, "prefill_tok_s": 0},
    ]}))
    planner = FrontierPlanner.from_json(path)
    assert len(planner.points) == 2 and planner.best(16, 23).setting == "MPS 80/40"


def test_bench_plan_on_the_committed_h200_frontier(capsys):
    """`rapid bench plan` on bench/results/frontier-h200.json (21 points). Worked out from the file by hand: at batch
    64 only the MPS 50/50, 50/100 and 30/100 points keep p90 TPOT under 25 ms (14.3, 13.3, 11.8 ms), 50/50 moves the
    most prompt tokens (16,349.5/s) and no hybrid point is that fast (chunk 2048: 61.6 ms); under 65 ms hybrid's
    chunk 2048 (32,125.4/s) beats rapid's best, MPS 100/100 (31,095.3/s at 41.6 ms)."""
    from rapid.entrypoints.cli import main

    frontier = ROOT / "bench" / "results" / "frontier-h200.json"
    planner = FrontierPlanner.from_json(frontier)
    assert len(planner.points) == 21
    assert planner.best(40, 25.0) == OperatingPoint("rapid", "MPS 50/50", 64, 13.589, 14.283, 16349.5)
    assert planner.gain(64, 25.0) is None and planner.best(64, 25.0, ("hybrid",)) is None
    assert (planner.best(64, 65.0).mode, planner.best(64, 65.0).setting) == ("hybrid", "chunk 2048")
    assert planner.gain(64, 65.0) == pytest.approx(31095.3 / 32125.4)
    assert main(["bench", "plan", "--frontier", str(frontier), "--batch", "64", "--tpot-slo-ms", "25"]) == 0
    assert capsys.readouterr().out.strip() == ("rapid MPS 50/50 (measured at batch 64): TPOT p90 14.283 ms, prefill "
                                               "16350 tok/s; no hybrid point meets it")
    assert main(["bench", "plan", "--frontier", str(frontier), "--batch", "64", "--tpot-slo-ms", "5"]) == 1
    assert "no measured point keeps p90 TPOT under 5.0 ms at batch 64" in capsys.readouterr().out

"""Adaptive resource management on recorded timings (no GPU)."""

import json

import pytest

from rapid.core.controller import FrontierPlanner, OperatingPoint

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


def test_planner_reads_the_committed_h100_frontier(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"points": [
        {"mode": "hybrid", "chunk": 256, "batch": 16, "tpot_mean_ms": 17.5, "tpot_p90_ms": 22.2, "prefill_tok_s": 14634},
        {"mode": "rapid", "split": "80/40", "batch": 16, "tpot_mean_ms": 16.7, "tpot_p90_ms": 17.6, "prefill_tok_s": 24490},
        {"mode": "rapid", "split": "x", "batch": 16, "tpot_mean_ms": None, "tpot_p90_ms": None, "prefill_tok_s": 0},
    ]}))
    planner = FrontierPlanner.from_json(path)
    assert len(planner.points) == 2 and planner.best(16, 23).setting == "MPS 80/40"

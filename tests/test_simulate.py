"""The placement policies replayed through rapid.bench.simulate on step timings recorded on the GPU with
`rapid bench frontier`: the adaptive policy's choices in known regimes, against hybrid batching and static
concurrent prefill on the same traces. No GPU.

The recording is the H200's (bench/results/frontier-h200.json: MPS 100/100, decode batches 16, 64 and 256,
session 13; 50/100 and 50/50, session 14); a variant of it where concurrency is cheap checks the other regime."""

import dataclasses
from pathlib import Path

import pytest

from rapid.bench.datasets import random_requests, sharegpt_like_requests
from rapid.bench.simulate import StepTimings, sim_trace, simulate
from rapid.core.adaptive import AdaptivePlacement
from rapid.core.placement import DECODE, PREFILL, StaticPlacement

FRONTIER = Path(__file__).parent.parent / "bench" / "results" / "frontier-h200.json"
SPLIT = "100/100"
SLO_PAIRS = ((1000, 50), (500, 25), (300, 15))  # (TTFT, TPOT) in ms, the adaptive issue's pairs


@pytest.fixture(scope="module")
def recorded():
    return StepTimings.from_frontier(FRONTIER, SPLIT)


def sharegpt(rate, burstiness=1.0, n=1200):
    return sim_trace(sharegpt_like_requests(n, 1000, seed=0, max_len=4096), rate, burstiness)


def long_prompts(rate, n=400):
    return sim_trace(random_requests(n, 3000, 300, 0.2, 1000, seed=0), rate)


def policies(ttft, tpot, budget=8192):
    return {"hybrid": StaticPlacement(DECODE), "rapid static": StaticPlacement(PREFILL),
            "adaptive": AdaptivePlacement(budget, ttft, tpot)}


def attainments(trace, timings, ttft, tpot):
    return {name: simulate(trace, p, timings).attainment(ttft, tpot) for name, p in policies(ttft, tpot).items()}


def test_the_recorded_timings_are_consistent(recorded):
    """Decode alone grows with the batch; beside a prefill it is slower; prompts run inline faster than beside."""
    assert recorded.batches == [16, 64, 256]
    assert recorded.decode_alone_ms == sorted(recorded.decode_alone_ms)
    assert all(b > a for a, b in zip(recorded.decode_alone_ms, recorded.decode_concurrent_ms))
    assert recorded.inline_tok_s > 10_000 and min(recorded.prefill_concurrent_tok_s) > 1_000


def test_every_request_runs_once_and_in_order_of_its_phases(recorded):
    trace = sharegpt(20, n=300)
    for name, policy in policies(500, 25).items():
        run = simulate(trace, policy, recorded)
        assert len(run.requests) == len(trace), name
        assert sum(run.placed.values()) == sum(p for _, p, _ in trace), name
        assert all(r.arrival_s < r.first_token_s <= r.finish_s for r in run.requests), name
    assert simulate(trace, StaticPlacement(DECODE), recorded).placed[PREFILL] == 0
    assert simulate(trace, StaticPlacement(PREFILL), recorded).placed[DECODE] == 0


@pytest.mark.parametrize("ttft,tpot", SLO_PAIRS)
@pytest.mark.parametrize("regime,trace", [
    ("light decode", lambda: sharegpt(10)),
    ("heavy decode", lambda: sharegpt(45)),
    ("long prompts", lambda: long_prompts(4)),
    ("bursts", lambda: sharegpt(30, burstiness=0.5)),
])
def test_adaptive_is_within_5_percent_of_the_best_static_placement(recorded, regime, trace, ttft, tpot):
    got = attainments(trace(), recorded, ttft, tpot)
    best = max(got["hybrid"], got["rapid static"])
    assert got["adaptive"] >= best - 0.05, (regime, got)
    assert got["adaptive"] >= got["hybrid"] - 0.05, (regime, got)


def cheap_concurrency(recorded):
    """The recording with the decode step beside the prefill worker only 10% slower than alone (a GPU where
    concurrency pays; on the H200 at MPS 100/100 it is 1.6-3.9x slower)."""
    return dataclasses.replace(recorded, decode_concurrent_ms=[1.1 * ms for ms in recorded.decode_alone_ms])


def dear_concurrency(recorded):
    """The recording with the decode step beside the prefill worker 4x slower than alone and that worker at a third of
    its rate (a GPU where concurrency does not pay; on the H200 at MPS 100/100 the step is 2.6-3.9x slower beside
    2048-token prompts, at the full rate)."""
    return dataclasses.replace(recorded, decode_concurrent_ms=[4 * ms for ms in recorded.decode_alone_ms],
                               prefill_concurrent_tok_s=[r / 3 for r in recorded.prefill_concurrent_tok_s])


@pytest.mark.parametrize("slos", [(500, 25), (None, None)])
def test_prompts_go_to_the_lane_that_costs_the_decodes_less(recorded, slos):
    """At a trickle most prompts find nothing decoding and run inline. Under load with short prompts, on the H200's
    timings (a decode step slowed only while a prefill batch runs beside it), the prefill worker costs the decodes
    about as much per prompt token as a mixed step: with a TPOT SLO prompts go there (at equal cost a mixed step puts
    the whole stall on the TPOT tail), as they did on the H200 (session 14, call B2: 93-96% of the prompt tokens at
    40-50 req/s); without SLOs hybrid batching, the simpler, keeps a large share. Where concurrency is dear they go
    inline."""
    trickle = simulate(sharegpt(0.2, n=40), AdaptivePlacement(8192, *slos), recorded).placed
    assert trickle[DECODE] > 0.5 * sum(trickle.values())
    loaded = simulate(sharegpt(40), AdaptivePlacement(8192, *slos), recorded).placed
    if slos[1] is not None:
        assert loaded[PREFILL] > 0.9 * sum(loaded.values()), loaded
    else:
        assert loaded[DECODE] > 0.25 * sum(loaded.values()), loaded
    dear = simulate(sharegpt(40), AdaptivePlacement(8192, *slos), dear_concurrency(recorded)).placed
    assert dear[DECODE] > 0.75 * sum(dear.values()), dear


@pytest.mark.parametrize("ttft,tpot", SLO_PAIRS)
def test_where_concurrency_is_cheap_adaptive_matches_it(recorded, ttft, tpot):
    """Long prompts at 7 req/s on the cheap-concurrency timings: the adaptive policy uses the prefill worker and is
    within 5% of static concurrent prefill. (It does not weigh the lanes' prompt capacity: at 500 ms / 25 ms hybrid
    batching, whose mixed steps prefill faster, reaches 0.995 there against its 0.915; a known gap.)"""
    got = attainments(long_prompts(7), cheap_concurrency(recorded), ttft, tpot)
    assert got["adaptive"] >= got["rapid static"] - 0.05, got


def test_the_h200_spatial_lever_in_known_regimes(recorded):
    """The H200 recording at a 50% prefill share (50/100, session 14): beside decodes it slows them as much per prompt
    token as the full share (20-28 against 24-27 us) at half the prefill rate. So, simulated: the ATOM rule (restricted
    prefill beside 64 or more decodes) loses attainment near saturation at 300/15 against static 100/100; the
    adaptive policy given the second prefill worker learns its cost, keeps to the full share (the half share is not
    clearly cheaper), and stays within 0.05 of the adaptive policy without it, above hybrid batching."""
    from rapid.core.placement import PREFILL2, AtomPlacement

    half = StepTimings.from_frontier(FRONTIER, "50/100")
    assert half.prefill_concurrent_tok_s[1] < 0.5 * recorded.prefill_concurrent_tok_s[1]
    trace = sharegpt(35)
    atom = simulate(trace, AtomPlacement(), recorded, second=half)
    assert atom.placed[PREFILL2] > 0 and atom.placed[PREFILL] > 0
    lever = simulate(trace, AdaptivePlacement(8192, 300, 15, prefill_lanes=(PREFILL, PREFILL2)), recorded, second=half)
    assert 0 < lever.placed[PREFILL2] < 0.05 * lever.placed[PREFILL]  # measured, then left
    got = attainments(trace, recorded, 300, 15)
    assert atom.attainment(300, 15) < got["rapid static"] - 0.2, (atom.attainment(300, 15), got)
    assert lever.attainment(300, 15) >= got["adaptive"] - 0.05, (lever.attainment(300, 15), got)
    assert lever.attainment(300, 15) > got["hybrid"], (lever.attainment(300, 15), got)
    with pytest.raises(ValueError, match="prefill2"):
        simulate(trace[:50], StaticPlacement(PREFILL2), recorded)  # no timings for the second worker

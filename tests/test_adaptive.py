"""The adaptive placement of mode 'rapid': its decisions in known regimes (light decode, heavy decode, long
prompts, a TTFT at risk, no SLOs), and the same policy inside the engine core (lanes, budgets, stats, logs)."""

import logging

import pytest

from fakes import finish_prefill, make_core
from rapid.config import EngineConfig, RapidConfig
from rapid.core.adaptive import AdaptivePlacement, make_placement
from rapid.core.placement import DECODE, PREFILL, Load, StaticPlacement
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest
from rapid.protocol.worker import DecodeStep, PrefillBatch, SampledToken


def load(decoding=64, queued=512, wait_s=0.0, step_ms=10.0):
    return Load(num_decoding=decoding, queued_tokens=queued, oldest_wait_s=wait_s, decode_step_ms=step_ms,
                prefill_lane_busy=False)


def test_idle_decode_executor_takes_the_prefill():
    p = AdaptivePlacement(8192, slo_ttft_ms=500, slo_tpot_ms=25)
    assert p.place(load(decoding=0, queued=20_000)) .lane == DECODE
    assert AdaptivePlacement(8192).place(load(decoding=0)).lane == DECODE  # without SLOs too


def test_heavy_decode_keeps_prefill_concurrent_and_bounded_by_tpot():
    """Decode steps over the TPOT target: no room for a mixed step; the concurrent budget halves per slow step."""
    p = AdaptivePlacement(8192, slo_ttft_ms=1000, slo_tpot_ms=25)
    for _ in range(3):
        p.observe_decode_step(30.0)  # over 0.8 x 25 ms
    d = p.place(load(decoding=256, queued=3000, step_ms=30.0))
    assert (d.lane, d.token_budget) == (PREFILL, 1024)
    grown = []
    for _ in range(60):  # fast steps: the average falls under the target, then the budget grows 256 a step
        p.observe_decode_step(8.0)
        grown.append(p.place(load(decoding=256, queued=3000, step_ms=8.0)).token_budget)
    low = grown.index(256)  # the floor, reached while the average was still over the target
    assert grown[low:] == sorted(grown[low:]) and grown[-1] == 8192
    assert {b - a for a, b in zip(grown[low:], grown[low + 1:])} <= {0, 256}


def test_long_prompts_never_stall_decode_steps():
    """A 3000-token prompt does not fit a mixed step under a 25 ms TPOT: it goes to the prefill worker."""
    p = AdaptivePlacement(8192, slo_ttft_ms=1000, slo_tpot_ms=25)
    assert p.place(load(decoding=8, queued=3000, step_ms=6.0)).lane == PREFILL


def test_ttft_at_risk_gets_the_full_budget():
    p = AdaptivePlacement(8192, slo_ttft_ms=400, slo_tpot_ms=25)
    for _ in range(6):
        p.observe_decode_step(40.0)
    assert p.place(load(queued=5000, wait_s=0.1, step_ms=40.0)).token_budget == 256  # TPOT first
    d = p.place(load(queued=5000, wait_s=0.25, step_ms=40.0))  # past half of 400 ms: TTFT first
    assert (d.lane, d.token_budget, d.reason) == (PREFILL, 8192, "TTFT at risk")


def test_without_slos_throughput_first():
    d = AdaptivePlacement(4096).place(load(decoding=300, queued=100, step_ms=30.0))
    assert (d.lane, d.token_budget) == (PREFILL, 4096)


def test_the_policy_of_each_configuration():
    def cfg(mode, **rapid):
        return EngineConfig(model="m", tokenizer=None, mode=mode, rapid=RapidConfig(**rapid))

    assert make_placement(cfg("hybrid", slo_tpot_ms=20)) == StaticPlacement(DECODE)
    assert make_placement(cfg("disagg")) == StaticPlacement(PREFILL)
    assert make_placement(cfg("rapid", placement="static")) == StaticPlacement(PREFILL)
    p = make_placement(cfg("rapid", slo_ttft_ms=300, slo_tpot_ms=15))
    assert isinstance(p, AdaptivePlacement) and (p.slo_ttft_ms, p.slo_tpot_ms) == (300, 15)
    with pytest.raises(ValueError, match="max_budget"):
        AdaptivePlacement(0)


def test_rapid_core_places_by_load_and_reports_it(caplog):
    """Through the engine core: with nothing decoding the decode executor prefills inline (no hand-off); once a
    batch decodes, prompts go to the prefill worker, within the TPOT-bounded budget; stats and logs name the lane."""
    core, w = make_core(num_blocks=1024, budget=4096, block_size=16, max_model_len=8192, placement="adaptive",
                        slo_ttft_ms=1000, slo_tpot_ms=25)
    caplog.set_level(logging.INFO, logger="rapid.core.placement")
    core.add_request(AddRequest("d", list(range(1, 101)), SamplingParams(max_tokens=100, ignore_eos=True)))
    core.dispatch()
    assert not w.prefill and [m for m in w.decode if isinstance(m, PrefillBatch)]
    finish_prefill(core, w, token=5, lane="decode")
    for t in range(3):  # 10 ms steps, under 0.8 x 25 ms: the full budget
        core.deliver(DecodeStep([SampledToken("d", 6, -1.0)], [], t, t + 0.010))
    core.add_request(AddRequest("long", list(range(5001, 8001)), SamplingParams(max_tokens=4)))
    core.dispatch()
    assert [(x.request_id, len(x.token_ids)) for x in w.prefill[-1].work] == [("long", 3000)]
    stats = core.get_stats()
    assert (stats.placement_policy, stats.placement) == ("adaptive", "prefill")
    assert stats.prefill_tokens_by_lane == {"decode": 100, "prefill": 3000}
    assert stats.prefill_batches_by_lane == {"decode": 1, "prefill": 1}
    lanes = [r.getMessage() for r in caplog.records if "prefill placement" in r.getMessage()]
    assert lanes == ["prefill placement (adaptive policy): decode lane (decode idle)",
                     "prefill placement (adaptive policy): prefill lane (concurrent, TPOT-bounded)"]

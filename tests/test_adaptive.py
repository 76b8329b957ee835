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


def test_idle_decode_executor_takes_the_first_prefill():
    p = AdaptivePlacement(8192, slo_ttft_ms=500, slo_tpot_ms=25)
    assert p.place(load(decoding=0, queued=20_000)).lane == DECODE
    assert AdaptivePlacement(8192).place(load(decoding=0)).lane == DECODE  # without SLOs too


def test_with_nothing_decoding_each_lane_is_tried_then_the_cheaper_one_kept():
    p = AdaptivePlacement(8192)
    idle = load(decoding=0, queued=2048)
    assert p.place(idle).lane == DECODE  # nothing learned yet: the decode executor first
    p.observe_prefill(DECODE, 2048, 0.080)  # 25.6k tok/s inline
    assert p.place(idle).lane == PREFILL  # then the prefill worker, once
    p.observe_prefill(PREFILL, 2048, 0.050)  # 41k tok/s
    assert p.place(idle).lane == PREFILL  # cheaper per token: kept
    for _ in range(20):
        p.observe_prefill(DECODE, 2048, 0.040)  # inline became cheaper (51k tok/s)
    assert p.place(idle).lane == DECODE


def learned(slo_ttft_ms=None, slo_tpot_ms=25, inline_tok_s=40_000, prefill_tok_s=30_000, step_ms=10.0,
            output_len=200):
    """A policy that has seen steady timings: 10 ms decode steps, the given prefill rates and output lengths."""
    p = AdaptivePlacement(8192, slo_ttft_ms, slo_tpot_ms)
    for _ in range(50):
        p.observe_decode_step(step_ms)
        p.observe_prefill(DECODE, 4000, step_ms * 1e-3 + 4000 / inline_tok_s, num_decoding=64)
        p.observe_prefill(PREFILL, 4000, 4000 / prefill_tok_s)
        p.observe_finished(output_len)
    return p


def test_the_costs_are_learned_from_the_timings():
    p = learned()
    c = p.costs
    assert c.decode_alone_ms == pytest.approx(10.0)
    assert c.inline_ms(False) == pytest.approx(1 / 40)  # the mixed step minus the decode step, per token
    assert c.inline_ms(True) == pytest.approx(1 / 40)  # not measured beside a prefill batch yet: the idle figure
    assert c.prefill_tok_s == pytest.approx(30_000) and c.output_len == pytest.approx(200)
    for _ in range(50):  # beside a prefill batch: 13 ms steps, prompt tokens at 10k tok/s
        p.observe_decode_step(13.0, beside_prefill=True)
        p.observe_prefill(DECODE, 1000, 0.013 + 0.1, num_decoding=64, beside_prefill=True)
    assert c.decode_beside_ms == pytest.approx(13.0) and c.inline_ms(True) == pytest.approx(0.1)
    assert c.decode_alone_ms == pytest.approx(10.0) and c.inline_ms(False) == pytest.approx(1 / 40)


def test_a_mixed_steps_cost_weighs_each_step_by_its_prompt_tokens():
    """Mixed steps of 512 prompt tokens at 25 us a token, then one of 16 tokens with 2 ms of noise (150 us a token
    on its own): the estimate moves by the tokens it saw, not by one step in five as an average of ratios would
    (which would read 50 us). Nor does one dear step of the usual size swing it (the last few mixed steps decided
    the lane before session 22: learned at 5.5-58 us a token on the H200 where the device's mixed steps cost 27). A
    lasting drift in the steps' cost still shows within about a hundred of them."""
    p = learned(inline_tok_s=40_000)  # 10 ms decode steps; 4000-token mixed steps at 25 us a token
    p.observe_prefill(DECODE, 16, (10.0 + 16 * 0.025 + 2.0) * 1e-3, num_decoding=64)
    assert p.costs.decode_cost_ms_per_token(DECODE) == pytest.approx(0.025, rel=0.02)
    for _ in range(30):
        p.observe_prefill(DECODE, 4000, (10.0 + 4000 * 0.025) * 1e-3, num_decoding=64)
    p.observe_prefill(DECODE, 4000, (10.0 + 4000 * 0.075) * 1e-3, num_decoding=64)  # one step at 3x the cost
    assert p.costs.decode_cost_ms_per_token(DECODE) == pytest.approx(0.025, rel=0.1)
    for _ in range(100):
        p.observe_prefill(DECODE, 4000, (10.0 + 4000 * 0.05) * 1e-3, num_decoding=64)  # 50 us a token now
    assert p.costs.decode_cost_ms_per_token(DECODE) == pytest.approx(0.05, rel=0.1)


def test_a_mixed_step_is_not_learned_as_a_decode_step():
    """Its period holds the prompt work too: counting it as decode alone would inflate the decode estimate and
    drive the per-token prompt cost (the mixed step less that estimate) towards zero."""
    p = learned()
    for _ in range(20):
        p.observe_decode_step(85.0, mixed=True)
    assert p.costs.decode_alone_ms == pytest.approx(10.0) and p.costs.decode_beside_ms is None


def test_a_full_step_sends_the_prompt_to_the_prefill_worker():
    """Decodes filling the step budget leave a mixed step no room: the prefill worker takes the prompt."""
    p = learned(prefill_tok_s=20_000)
    roomy = Load(64, 3000, 0.0, 10.0, prefill_lane_busy=False, mixed_step_room=4000)
    full = Load(64, 3000, 0.0, 10.0, prefill_lane_busy=False, mixed_step_room=0)
    assert p.place(roomy).lane == DECODE and p.place(full).lane == PREFILL
    # 1000 tokens of room: 15 + 25 ms inline against 50 ms on the worker: a mixed step of what fits
    d = p.place(Load(64, 3000, 0.0, 10.0, prefill_lane_busy=False, mixed_step_room=1000))
    assert (d.lane, d.token_budget) == (DECODE, 1000)


def test_a_mixed_step_when_it_gives_the_first_token_sooner_inside_the_tpot_slo():
    """Inline: 15 ms + 3000 / 40k tok/s = 90 ms; the prefill worker: 3000 / 30k = 100 ms. Its 75 ms stall spread
    over 200 output tokens adds 0.4 ms to the 10 ms steps, under 0.8 x 25 ms."""
    p = learned()
    d = p.place(load(queued=3000))
    assert (d.lane, d.token_budget, d.bounds_step) == (DECODE, 3000, True)  # the TPOT check sized the step
    assert p.inline_ttft_ms(load(queued=3000), 3000) == pytest.approx(90.0)
    # the prefill worker faster than inline: concurrent
    assert learned(prefill_tok_s=60_000).place(load(queued=3000)).lane == PREFILL
    # the prefill worker busy: its next batch waits, so the mixed step wins even against a faster worker
    busy = Load(64, 3000, 0.0, 10.0, prefill_lane_busy=True)
    assert learned(prefill_tok_s=35_000).place(busy).lane == DECODE


def test_no_mixed_step_that_would_break_the_tpot_slo():
    """Short outputs (20 tokens): the 75 ms stall adds 3.75 ms per token: 13.75 ms, over 0.8 x 15 ms."""
    p = learned(slo_tpot_ms=15, output_len=20)
    assert p.inline_ttft_ms(load(queued=3000), 3000) is None
    assert p.place(load(queued=3000)).lane == PREFILL
    assert learned(slo_tpot_ms=15, output_len=200).place(load(queued=3000)).lane == DECODE


def test_no_mixed_step_when_the_prefill_worker_meets_the_ttft_slo_anyway():
    """With a TTFT SLO of 1 s, the worker's 100 ms is well inside half of it: TPOT is not spent for nothing;
    once the oldest request has waited 450 ms, 450 + 100 ms is past half: the sooner lane again."""
    p = learned(slo_ttft_ms=1000)
    assert p.place(load(queued=3000, wait_s=0.0)).lane == PREFILL
    assert p.place(load(queued=3000, wait_s=0.45)).lane == DECODE


def test_without_slos_throughput_first():
    """No TPOT SLO: beside decodes, always the prefill worker with the full budget."""
    d = learned(slo_tpot_ms=None).place(load(decoding=300, queued=100, step_ms=30.0))
    assert (d.lane, d.token_budget) == (PREFILL, 8192)


@pytest.mark.parametrize("beside_ms,want", [(30.0, DECODE), (16.6, DECODE), (10.5, PREFILL)])
def test_beside_decodes_the_lane_that_costs_them_less_per_prompt_token(beside_ms, want):
    """A mixed step costs the decodes its prompt work (25 us a token here); the prefill worker costs them the
    slowdown of the decode steps it runs beside, over the tokens it prefilled meanwhile: 20 ms per 300 tokens
    (67 us a token: inline), 6.6 ms (22 us: about the same) or 0.5 ms (1.7 us: concurrent). At about the same cost
    hybrid batching (the simpler), with a TPOT SLO as without: with whole-graph mixed steps hybrid's TPOT tail was
    the lower on the H200 (sessions 18-19), so a concurrent prefill no longer wins ties for the tail's sake."""
    for slo_tpot_ms in (25, None):
        p = learned(slo_tpot_ms=slo_tpot_ms)  # 10 ms decode steps alone, 40k tok/s inline
        for _ in range(50):
            p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)
            p.observe_decode_step(beside_ms, beside_prefill=True)
        assert p.costs.decode_cost_ms_per_token(DECODE) == pytest.approx(0.025)
        assert p.costs.decode_cost_ms_per_token(PREFILL) == pytest.approx((beside_ms - 10.0) / 300, rel=0.05)
        figures = p.learned()  # the same figures as the engine's stats report them (us per prompt token)
        assert figures["decode_us_per_prompt_token:decode"] == pytest.approx(25.0)
        assert figures["decode_us_per_prompt_token:prefill"] == pytest.approx((beside_ms - 10.0) / 0.3, rel=0.05)
        assert figures["prefill_tok_s:prefill"] == pytest.approx(30_000) and figures["decode_alone_ms"] > 0
        placed = p.place(load(decoding=64, queued=512))
        assert placed.lane == want and "cheaper for the decodes" in placed.reason
        # the chunk is what is queued now, not a size for the step: prompts arriving later may share it
        assert not placed.bounds_step


@pytest.mark.parametrize("mixed_us,then", [(4, DECODE), (30, PREFILL)])
def test_a_mixed_step_is_measured_beside_decodes_before_the_lanes_are_compared(mixed_us, then):
    """A step with nothing decoding teaches only the idle cost (64 tokens in 5 ms: its fixed cost dwarfs a mixed
    step's marginal one). Once the prefill worker's cost to the decodes is known (10 us a token here), a few mixed
    steps are tried to measure theirs; then the cheaper lane is kept."""
    p = AdaptivePlacement(8192, slo_ttft_ms=300, slo_tpot_ms=15)
    p.observe_prefill(DECODE, 64, 0.005)
    assert p.costs.decode_cost_ms_per_token(DECODE) is None and p.costs.idle_inline_ms_per_token > 0.07
    p.observe_decode_step(6.0)
    for _ in range(20):
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)
        p.observe_decode_step(9.0, beside_prefill=True)
    lanes = []
    for _ in range(6):
        placed = p.place(load(decoding=64, queued=512, step_ms=6.0))
        lanes.append(placed.lane)
        assert placed.bounds_step == ("measuring" in placed.reason)  # a sample runs alone, to be measured
        if placed.lane == DECODE:
            p.observe_prefill(DECODE, 512, (6.0 + 512 * mixed_us * 1e-3) * 1e-3, num_decoding=64)
    assert lanes == [DECODE] * 3 + [then] * 3
    assert p.costs.decode_cost_ms_per_token(DECODE) == pytest.approx(mixed_us * 1e-3)


@pytest.mark.parametrize("steps_per_batch", [1, 5, 20])
def test_the_concurrent_cost_counts_every_decode_step_beside_a_batch(steps_per_batch):
    """10 ms decode steps alone, 20 ms beside the prefill worker: a 1,000-token batch that k steps ran beside cost
    the decodes k x 10 ms, whatever k; and nothing is counted before a decode step alone was measured."""
    p = AdaptivePlacement(8192)
    p.observe_decode_step(20.0, beside_prefill=True)
    p.observe_prefill(PREFILL, 1000, 0.1, num_decoding=64)  # no decode step alone yet: not counted
    assert p.costs.beside_batches.get(PREFILL, 0) == 0
    p.observe_decode_step(10.0)
    for _ in range(10):
        for _ in range(steps_per_batch):
            p.observe_decode_step(20.0, beside_prefill=True)
        p.observe_prefill(PREFILL, 1000, 0.1, num_decoding=64)
    assert p.costs.decode_cost_ms_per_token(PREFILL) == pytest.approx(steps_per_batch * 10.0 / 1000)


def test_the_other_lane_is_sampled_again_now_and_then():
    """Costs drift (batch sizes, prompt lengths): after REEXPLORE_EVERY placements on the cheaper lane, one batch
    goes to the other lane."""
    from rapid.core.adaptive import REEXPLORE_EVERY

    p = learned(slo_tpot_ms=25)  # inline: 25 us a token
    for _ in range(5):
        p.observe_decode_step(10.5, beside_prefill=True)
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)  # concurrent: 1.7 us a token
    lanes = [p.place(load(decoding=64, queued=512)).lane for _ in range(3 * REEXPLORE_EVERY + 2)]
    assert [i for i, lane in enumerate(lanes) if lane == DECODE] == [REEXPLORE_EVERY, 3 * REEXPLORE_EVERY + 1]


def test_samples_grow_rarer_while_the_cheapest_lane_holds_and_sooner_once_it_changes():
    """Each sample that leaves the cheapest lane as it was doubles the interval to the next (64, 128, ... up to
    REEXPLORE_MAX placements): every sample lengthens the decode steps beside it. A change of the cheapest lane
    brings the interval back to REEXPLORE_EVERY."""
    from rapid.core.adaptive import REEXPLORE_EVERY, REEXPLORE_MAX

    p = learned(slo_tpot_ms=25)  # inline: 25 us a token
    for _ in range(5):
        p.observe_decode_step(10.5, beside_prefill=True)
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)  # concurrent: 1.7 us a token
    lanes = [p.place(load(decoding=64, queued=512)).lane for _ in range(4000)]
    samples = [i for i, lane in enumerate(lanes) if lane == DECODE]
    gaps = [b - a - 1 for a, b in zip([-1, *samples], samples)]  # placements on the cheapest lane before each
    assert gaps[:5] == [REEXPLORE_EVERY, 2 * REEXPLORE_EVERY, 4 * REEXPLORE_EVERY, 8 * REEXPLORE_EVERY,
                        REEXPLORE_MAX]
    assert set(gaps[4:]) == {REEXPLORE_MAX}  # 10 samples in 4000 placements, not 61
    # the prefill worker's batches now slow the decodes far more: the mixed step becomes the cheaper lane, and the
    # prefill worker is sampled again REEXPLORE_EVERY placements later
    for _ in range(200):
        p.observe_decode_step(30.0, beside_prefill=True)
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)
    assert p.cost(PREFILL) > p.cost(DECODE)
    lanes = [p.place(load(decoding=64, queued=512)).lane for _ in range(REEXPLORE_EVERY + 1)]
    assert lanes == [DECODE] * REEXPLORE_EVERY + [PREFILL]


def test_questions_whose_lane_is_busy_do_not_hold_the_samples_off():
    """Two prefill workers: the restricted one is the cheapest while the queue is short, the full one when the
    restricted one would miss the TTFT SLO. Free questions (short queue) are taken; busy ones (long queue) are
    dropped. Only the placements taken say which lane is the cheapest: counting the dropped ones as changes reset
    the count before every sample, and the other lanes were never measured again."""
    from dataclasses import replace

    from rapid.core.placement import PREFILL2

    p = AdaptivePlacement(8192, slo_ttft_ms=500, slo_tpot_ms=25, prefill_lanes=(PREFILL, PREFILL2))
    p.observe_decode_step(10.0)
    for _ in range(60):
        p.observe_prefill(DECODE, 400, 0.01 + 400 * 40e-6, num_decoding=64)  # a mixed step: 40 us a prompt token
        p.observe_prefill(PREFILL, 300, 0.02, num_decoding=64)  # 15k tok/s, 20 us a token beside decodes
        p.observe_decode_step(16.0, beside_prefill=PREFILL)
        p.observe_prefill(PREFILL2, 300, 0.04, num_decoding=64)  # 7.5k tok/s, 5 us a token
        p.observe_decode_step(11.5, beside_prefill=PREFILL2)
    short, long_busy = load(queued=512), replace(load(queued=5000), prefill_lane_busy=True)
    assert p.cheapest_lane(short) == PREFILL2 and p.cheapest_lane(long_busy) == PREFILL
    reasons = []
    for _ in range(2000):
        reasons.append(p.place(short).reason)
        for _ in range(3):
            p.place(long_busy)
    assert reasons.count("measuring its cost again") == 6  # after 64, 128, 256, 512 and 512 placements


def dearer_prefill_worker():
    """A policy that measured a mixed step at 25 us of decode time a prompt token and the prefill worker at 33."""
    p = learned(slo_tpot_ms=25)
    for _ in range(5):
        p.observe_decode_step(20.0, beside_prefill=True)
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)
    assert p.cost(PREFILL) > p.cost(DECODE)
    return p


def test_only_placements_taken_count_towards_the_next_sample():
    """The engine asks before every step and drops an answer whose lane is busy: those questions do not bring the
    next sample of the other lane nearer (on the H200 they sent up to 20% of the prompt tokens to the prefill
    worker, as samples, at 44 req/s)."""
    from dataclasses import replace

    from rapid.core.adaptive import REEXPLORE_EVERY

    p = dearer_prefill_worker()
    busy = replace(load(decoding=64, queued=512), decode_lane_busy=True)
    assert [p.place(busy).lane for _ in range(10 * REEXPLORE_EVERY)] == [DECODE] * (10 * REEXPLORE_EVERY)
    taken = [p.place(load(decoding=64, queued=512)).lane for _ in range(REEXPLORE_EVERY)]
    assert taken == [DECODE] * REEXPLORE_EVERY  # the placements taken so far: none sampled yet
    assert p.place(load(decoding=64, queued=512)).lane == PREFILL  # the next one is the sample


def test_a_sample_waits_for_its_lane():
    from dataclasses import replace

    from rapid.core.adaptive import REEXPLORE_EVERY

    p = dearer_prefill_worker()
    for _ in range(REEXPLORE_EVERY):
        assert p.place(load(decoding=64, queued=512)).lane == DECODE
    assert p.place(replace(load(decoding=64, queued=512), prefill_lane_busy=True)).lane == DECODE
    assert p.place(load(decoding=64, queued=512)).lane == PREFILL  # once free, the sample runs
    for _ in range(2 * REEXPLORE_EVERY):  # the cheapest lane held: the next sample comes after twice as many
        assert p.place(load(decoding=64, queued=512)).lane == DECODE
    # the only prompt tokens queued follow a chunk in flight on the decode executor: a prefill worker could take none,
    # so the sample waits (sent there it built no batch, and was lost until REEXPLORE_EVERY placements later)
    chained_only = replace(load(decoding=64, queued=512), prefill_queued_tokens=0)
    assert [p.place(chained_only).lane for _ in range(3)] == [DECODE] * 3
    assert p.place(load(decoding=64, queued=512)).lane == PREFILL
    # the other way round: the prefill worker is the cheaper lane, and the sample of a mixed step waits while the
    # decode executor holds all the chunks it takes
    p = learned(slo_tpot_ms=25)
    for _ in range(5):
        p.observe_decode_step(10.5, beside_prefill=True)
        p.observe_prefill(PREFILL, 300, 0.01, num_decoding=64)  # concurrent: 1.7 us a token
    for _ in range(REEXPLORE_EVERY):
        assert p.place(load(decoding=64, queued=512)).lane == PREFILL
    decode_busy = replace(load(decoding=64, queued=512), decode_lane_busy=True)
    assert [p.place(decode_busy).lane for _ in range(3)] == [PREFILL] * 3
    sample = p.place(load(decoding=64, queued=512))
    assert (sample.lane, sample.token_budget) == (DECODE, 512)


def test_nothing_learned_yet_means_concurrent_beside_decodes():
    assert AdaptivePlacement(8192, 500, 25).place(load(queued=100)).lane == PREFILL


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
    batch decodes, prompts go to the prefill worker (nothing says a mixed step is better); stats and logs name
    the lane."""
    core, w = make_core(num_blocks=1024, budget=4096, block_size=16, max_model_len=8192, placement="adaptive",
                        slo_ttft_ms=1000, slo_tpot_ms=25)
    caplog.set_level(logging.INFO, logger="rapid.core.placement")
    core.add_request(AddRequest("d", list(range(1, 101)), SamplingParams(max_tokens=100, ignore_eos=True)))
    core.dispatch()
    assert not w.prefill and [m for m in w.decode if isinstance(m, PrefillBatch)]
    finish_prefill(core, w, token=5, lane="decode")
    for t in range(3):  # decode steps; the prefill worker's rate is not known yet: concurrent
        core.deliver(DecodeStep([SampledToken("d", 6, -1.0)], [], t, t + 0.010))
    core.add_request(AddRequest("long", list(range(5001, 8001)), SamplingParams(max_tokens=4)))
    core.dispatch()
    assert [(x.request_id, len(x.token_ids)) for x in w.prefill[-1].work] == [("long", 3000)]
    stats = core.get_stats()
    assert (stats.placement_policy, stats.placement) == ("adaptive", "prefill")
    assert stats.prefill_tokens_by_lane == {"decode": 100, "prefill": 3000}
    assert stats.prefill_batches_by_lane == {"decode": 1, "prefill": 1}
    assert stats.prefill_batches_by_reason == {"decode: decode idle": 1, "prefill: concurrent": 1}
    # what the policy has measured so far: the decode step alone (10 ms); no lane's cost to the decodes yet
    assert stats.placement_learned["decode_alone_ms"] == pytest.approx(10.0, rel=0.01)
    assert not any(k.startswith("decode_us_per_prompt_token") for k in stats.placement_learned)
    core.abort(["long"])  # an abort is no completed output: the policy's output length stays unlearned
    assert core.core.scheduler.placement.costs.output_len is None
    lanes = [r.getMessage() for r in caplog.records if "prefill placement" in r.getMessage()]
    assert lanes == ["prefill placement (adaptive policy): decode lane (decode idle)",
                     "prefill placement (adaptive policy): prefill lane (concurrent)"]


def test_metrics_carry_the_learned_costs_per_lane():
    """/metrics: rapid:placement_cost_us_per_prompt_token{lane} from Stats.placement_learned, one sample per lane
    measured (none before)."""
    from prometheus_client.parser import text_string_to_metric_families

    from rapid.entrypoints.openai.metrics import ServerMetrics
    from rapid.protocol.engine import Stats

    def samples(learned):
        stats = Stats([], [], [], [], placement_learned=learned)
        text = ServerMetrics("m", "rapid", get_stats=lambda: stats, stats_interval_s=0).render().decode()
        return {s.labels["lane"]: s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == "rapid:placement_cost_us_per_prompt_token"}

    assert samples({"decode_alone_ms": 9.0}) == {}
    got = samples({"decode_alone_ms": 9.0, "decode_us_per_prompt_token:decode": 25.0,
                   "decode_us_per_prompt_token:prefill": 18.5, "prefill_tok_s:prefill": 30000.0})
    assert got == {"decode": 25.0, "prefill": 18.5}


def test_a_decode_step_says_whether_it_carried_a_chunk():
    """The policy learns the decode step alone from the steps that ran no prompt tokens, as each step's device time
    says (with two chunks held on the decode lane, a chunk in flight no longer means the step carried one)."""
    from rapid.core.placement import Placement, ReadsNoTimings
    from rapid.protocol.worker import DeviceTime

    class Spy(ReadsNoTimings):
        name, reads_load, steps = "spy", False, []

        def place(self, load):
            return Placement(DECODE, None, "spy")

        def observe_decode_step(self, step_ms, beside_prefill=False, mixed=False):
            self.steps.append((round(step_ms, 3), mixed))

    core, w = make_core(num_blocks=1024, budget=4096, block_size=16, max_model_len=8192)
    core.core.scheduler.placement = spy = Spy()
    core.add_request(AddRequest("d", list(range(1, 101)), SamplingParams(max_tokens=100, ignore_eos=True)))
    core.dispatch()
    finish_prefill(core, w, token=5, lane="decode")
    core.add_request(AddRequest("p", list(range(200, 300)), SamplingParams(max_tokens=4)))
    core.dispatch()
    assert core.core.scheduler.in_flight.busy(DECODE)  # a chunk held on the decode lane
    core.deliver(DecodeStep([SampledToken("d", 6, -1.0)], [], 0.0, 0.030, device=DeviceTime("mixed", 0.03, 0.0)))
    core.deliver(DecodeStep([SampledToken("d", 6, -1.0)], [], 1.0, 1.010, device=DeviceTime("decode", 0.01, 0.0)))
    core.deliver(DecodeStep([SampledToken("d", 6, -1.0)], [], 2.0, 2.012))  # untimed: the chunk may be in it
    assert spy.steps == [(30.0, True), (10.0, False), (12.0, True)]


def test_a_mixed_step_beside_a_batch_is_charged_to_it_too():
    """10 ms decode steps alone, 25 us a prompt token in a mixed step: beside the prefill worker's 300-token batches
    a decode step took 14 ms (4 over alone) and a mixed step of 200 prompt tokens 21 ms (6 over the same step
    alone), so each batch cost the decodes 10 ms, 33 us a prompt token. Before session 23 the mixed step was left
    out (13 us a token), and on the H200 mixed steps took 43% of the decode executor's time."""
    p = AdaptivePlacement(8192)
    for _ in range(20):
        p.observe_decode_step(10.0)
        p.observe_prefill(DECODE, 200, 0.015, num_decoding=64)
    for _ in range(50):
        p.observe_decode_step(14.0, beside_prefill=PREFILL)
        p.observe_prefill(DECODE, 200, 0.021, num_decoding=64, beside_prefill=PREFILL)
        p.observe_prefill(PREFILL, 300, 0.03, num_decoding=64)
    assert p.cost(PREFILL) == pytest.approx(10.0 / 300)
    assert p.cost(DECODE) == pytest.approx(0.025)  # a mixed step alone still costs what it did


def test_each_prefill_worker_is_charged_the_slowdown_of_the_steps_that_ran_beside_it():
    """With two prefill workers a decode step's slowdown is charged to the worker it ran beside, even when it is
    read after that worker's answer and before the other one's: the full-share worker slows the decodes by 6 ms a
    batch of 300 tokens (20 us a token), the restricted one by 1.5 ms (5 us a token)."""
    from rapid.core.placement import PREFILL2

    p = AdaptivePlacement(8192, prefill_lanes=(PREFILL, PREFILL2))
    p.observe_decode_step(10.0)
    for _ in range(60):  # (each worker's first batch is charged nothing: its step is read after its answer)
        p.observe_prefill(PREFILL, 300, 0.02, num_decoding=64)
        p.observe_decode_step(16.0, beside_prefill=PREFILL)  # read after its worker's answer
        p.observe_prefill(PREFILL2, 300, 0.04, num_decoding=64)
        p.observe_decode_step(11.5, beside_prefill=PREFILL2)
    assert p.cost(PREFILL) == pytest.approx(6.0 / 300, rel=0.03)
    assert p.cost(PREFILL2) == pytest.approx(1.5 / 300, rel=0.03)


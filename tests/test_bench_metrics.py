"""Tests of rapid.bench: metrics against hand-computed cases, goodput interpolation, arrival
statistics, dataset generators and plots. Pure Python + numpy (+ matplotlib for plots); fast."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from rapid.bench import (
    GoodputResult,
    RequestRecord,
    SampleRequest,
    arrival_times,
    compute_metrics,
    goodput_per_gpu,
    goodput_rate,
    parse_goodput,
    percentile_key,
    plot_attainment,
    plot_frontier,
    plot_latency_percentiles,
    random_requests,
    sharegpt_like_requests,
    sharegpt_requests,
    slo_attainment,
)

approx = pytest.approx


# --------------------------------------------------------------------------------------------
# a small hand-computed run


def _records() -> list[RequestRecord]:
    """Four requests; times in seconds.

    A: prompt 10, 5 output tokens, ttft 0.1, latency 0.5, itl [0.1]*4 -> TPOT (0.5-0.1)/4 = 0.1
    B: prompt 20, 3 output tokens, ttft 0.2, latency 0.6, itl [0.2]*2 -> TPOT (0.6-0.2)/2 = 0.2
    C: prompt 30, 1 output token,  ttft 0.3, latency 0.3, itl []      -> no TPOT
    D: prompt 40, failed
    """
    return [
        RequestRecord(prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestRecord(prompt_len=20, output_len=3, ttft=0.2, latency=0.6, itl=[0.2] * 2),
        RequestRecord(prompt_len=30, output_len=1, ttft=0.3, latency=0.3, itl=[]),
        RequestRecord(prompt_len=40, output_len=0, success=False, error="boom"),
    ]


def test_tpot_per_request():
    a, b, c, d = _records()
    assert a.tpot == approx(0.1)  # (0.5 - 0.1) / (5 - 1)
    assert b.tpot == approx(0.2)  # (0.6 - 0.2) / (3 - 1)
    assert c.tpot is None  # one output token: undefined
    assert d.tpot is None  # failed


def test_counts_and_throughputs():
    m = compute_metrics(_records(), duration_s=2.0)
    assert m["duration"] == 2.0
    assert m["completed"] == 3  # A, B, C
    assert m["failed"] == 1  # D
    assert m["total_input_tokens"] == 60  # 10 + 20 + 30 (D not counted)
    assert m["total_output_tokens"] == 9  # 5 + 3 + 1
    assert m["request_throughput"] == approx(1.5)  # 3 / 2
    assert m["output_throughput"] == approx(4.5)  # 9 / 2
    assert m["total_token_throughput"] == approx(34.5)  # (60 + 9) / 2
    assert m["request_goodput"] is None  # no SLOs given


def test_ttft_stats():
    m = compute_metrics(_records(), duration_s=2.0)
    # TTFTs [0.1, 0.2, 0.3] s
    assert m["mean_ttft_ms"] == approx(200.0)
    assert m["median_ttft_ms"] == approx(200.0)
    # population std: sqrt((0.1^2 + 0 + 0.1^2) / 3) = sqrt(0.02/3) = 0.0816497 s
    assert m["std_ttft_ms"] == approx(1000 * math.sqrt(0.02 / 3))
    # linear percentiles on 3 points: position p/100 * 2
    assert m["p50_ttft_ms"] == approx(200.0)  # position 1.0 -> 0.2
    assert m["p90_ttft_ms"] == approx(280.0)  # position 1.8 -> 0.2 + 0.8 * 0.1
    assert m["p99_ttft_ms"] == approx(298.0)  # position 1.98 -> 0.2 + 0.98 * 0.1


def test_tpot_stats_exclude_single_token_requests():
    m = compute_metrics(_records(), duration_s=2.0)
    # TPOTs [0.1, 0.2] s (C has one token, D failed)
    assert m["mean_tpot_ms"] == approx(150.0)
    assert m["median_tpot_ms"] == approx(150.0)
    assert m["std_tpot_ms"] == approx(50.0)  # |0.1 - 0.15| = |0.2 - 0.15| = 0.05
    assert m["p90_tpot_ms"] == approx(190.0)  # position 0.9 -> 0.1 + 0.9 * 0.1
    assert m["p99_tpot_ms"] == approx(199.0)  # position 0.99 -> 0.1 + 0.99 * 0.1


def test_itl_stats_pool_all_gaps():
    m = compute_metrics(_records(), duration_s=2.0)
    # pooled ITLs [0.1, 0.1, 0.1, 0.1, 0.2, 0.2] s
    assert m["mean_itl_ms"] == approx(1000 * 0.8 / 6)  # 133.33 ms
    assert m["median_itl_ms"] == approx(100.0)  # (0.1 + 0.1) / 2
    # mean 2/15; deviations -1/30 (x4) and 1/15 (x2): (4/900 + 8/900) / 6 = 2/900
    assert m["std_itl_ms"] == approx(1000 * math.sqrt(2 / 900))  # 47.14 ms
    assert m["p50_itl_ms"] == approx(100.0)
    assert m["p90_itl_ms"] == approx(200.0)  # position 4.5, both neighbours 0.2


def test_e2el_stats():
    m = compute_metrics(_records(), duration_s=2.0)
    # latencies [0.5, 0.6, 0.3] s; sorted [0.3, 0.5, 0.6]
    assert m["mean_e2el_ms"] == approx(1400 / 3)  # 466.67 ms
    assert m["median_e2el_ms"] == approx(500.0)
    assert m["p90_e2el_ms"] == approx(580.0)  # position 1.8 -> 0.5 + 0.8 * 0.1


def test_vllm_key_names():
    m = compute_metrics(
        _records(), duration_s=2.0, goodput_slos={"ttft": 250}, percentiles=(99, 99.9)
    )
    expected = [
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
        "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    ]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        expected += [f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"]
        expected += [f"p99_{metric}_ms", f"p99.9_{metric}_ms"]
    assert list(m) == expected
    assert percentile_key("ttft", 99.0) == "p99_ttft_ms"
    assert percentile_key("itl", 99.9) == "p99.9_itl_ms"


def test_goodput_in_compute_metrics():
    # SLO ttft 250 ms, tpot 150 ms:
    #   A ttft 0.1 ok, tpot 0.1 ok -> good
    #   B ttft 0.2 ok, tpot 0.2 > 0.15 -> miss
    #   C ttft 0.3 > 0.25 -> miss;  D failed -> not counted
    # 1 good request / 2 s = 0.5 req/s
    m = compute_metrics(_records(), 2.0, goodput_slos={"ttft": 250, "tpot": 150})
    assert m["request_goodput"] == approx(0.5)
    # Same via the string form; ttft 350 now lets C through (its TPOT counts as 0): 2 / 2 s
    m = compute_metrics(_records(), 2.0, goodput_slos="ttft:350 tpot:150")
    assert m["request_goodput"] == approx(1.0)


def test_empty_metrics_report_zero_like_vllm():
    failed = [RequestRecord(prompt_len=5, output_len=0, success=False, error="x")]
    m = compute_metrics(failed, duration_s=1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_compute_metrics_rejects_bad_arguments():
    with pytest.raises(ValueError):
        compute_metrics(_records(), duration_s=0.0)
    with pytest.raises(ValueError):
        compute_metrics(_records(), 1.0, percentiles=(101,))
    with pytest.raises(ValueError):
        compute_metrics(_records(), 1.0, goodput_slos={"latency": 5})


# --------------------------------------------------------------------------------------------
# SLO parsing and attainment


def test_parse_goodput_forms():
    assert parse_goodput("ttft:1000 tpot:50") == {"ttft": 1000.0, "tpot": 50.0}
    assert parse_goodput(["ttft:1000", "e2el:2500.5"]) == {"ttft": 1000.0, "e2el": 2500.5}
    assert parse_goodput("TTFT:200, tpot:40") == {"ttft": 200.0, "tpot": 40.0}


@pytest.mark.parametrize(
    "spec",
    ["", "ttft", "ttft:abc", "foo:10", "ttft:0", "ttft:-5", "ttft:inf", "ttft:1 ttft:2", "a:b:c"],
)
def test_parse_goodput_errors(spec):
    with pytest.raises(ValueError):
        parse_goodput(spec)


def test_slo_attainment_counts_failures_and_single_token_requests():
    records = _records()
    # ttft 250, tpot 150: only A meets both (see test_goodput_in_compute_metrics); D failed.
    # Share of ALL 4 requests: 1/4
    assert slo_attainment(records, ttft_ms=250, tpot_ms=150) == approx(0.25)
    # ttft 350: A meets both, B misses tpot, C (1 token) judged on TTFT only -> meets. 2/4
    assert slo_attainment(records, ttft_ms=350, tpot_ms=150) == approx(0.5)
    # generous SLOs: everything but the failure -> 3/4
    assert slo_attainment(records, ttft_ms=1000, tpot_ms=1000) == approx(0.75)
    # exactly on the SLO counts as met: A's ttft 100 ms, tpot 100 ms
    assert slo_attainment(records[:1], ttft_ms=100, tpot_ms=100) == 1.0
    # None skips an SLO: TTFT only, 300 ms -> A, B, C meet; D fails -> 3/4
    assert slo_attainment(records, ttft_ms=300, tpot_ms=None) == approx(0.75)
    # e2el as a third SLO: latencies 0.5, 0.6, 0.3 -> 500 ms lets A and C through -> 2/4
    assert slo_attainment(records, None, None, e2el_ms=500) == approx(0.5)


def test_slo_attainment_errors():
    with pytest.raises(ValueError):
        slo_attainment([], 100, 100)
    with pytest.raises(ValueError):
        slo_attainment(_records(), 0, 100)


# --------------------------------------------------------------------------------------------
# goodput


def test_goodput_interpolates_first_crossing():
    # crossing between (2, 0.95) and (3, 0.85): 2 + (0.95 - 0.9) / (0.95 - 0.85) * (3 - 2) = 2.5
    res = goodput_rate([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.5], target=0.9)
    assert res.rate == approx(2.5)
    assert not res.is_lower_bound and not res.below_range
    assert float(res) == approx(2.5)


def test_goodput_sorts_by_rate_and_uses_spacing():
    # unsorted input; crossing between (4, 0.92) and (8, 0.72):
    # 4 + (0.92 - 0.9) / (0.92 - 0.72) * (8 - 4) = 4 + 0.1 * 4 = 4.4
    res = goodput_rate([8, 2, 4], [0.72, 0.99, 0.92])
    assert res.rate == approx(4.4)


def test_goodput_exact_hit_and_other_target():
    # attainment exactly at target at rate 2 -> 2 + 0 = 2
    assert goodput_rate([1, 2, 3], [1.0, 0.9, 0.6]).rate == approx(2.0)
    # target 0.5: crossing between (3, 0.6) and (4, 0.2): 3 + (0.6-0.5)/(0.6-0.2) * 1 = 3.25
    assert goodput_rate([1, 2, 3, 4], [1.0, 0.9, 0.6, 0.2], target=0.5).rate == approx(3.25)


def test_goodput_first_crossing_ignores_later_recovery():
    # drops below at rate 2 (crossing 1 + (1 - 0.9)/(1 - 0.8) = 1.5), recovers at 3: ignored
    assert goodput_rate([1, 2, 3], [1.0, 0.8, 0.95]).rate == approx(1.5)


def test_goodput_never_below_target_is_lower_bound():
    res = goodput_rate([1, 2, 3], [1.0, 0.99, 0.91])
    assert res == GoodputResult(3.0, is_lower_bound=True, below_range=False)


def test_goodput_lowest_rate_already_misses():
    res = goodput_rate([1, 2, 3], [0.8, 0.5, 0.1])
    assert res == GoodputResult(0.0, is_lower_bound=False, below_range=True)


@pytest.mark.parametrize(
    "rates, atts, target",
    [([], [], 0.9), ([1, 2], [1.0], 0.9), ([1, 1], [1.0, 0.5], 0.9), ([0, 1], [1.0, 0.5], 0.9),
     ([1], [1.5], 0.9), ([1], [1.0], 0.0)],
)
def test_goodput_errors(rates, atts, target):
    with pytest.raises(ValueError):
        goodput_rate(rates, atts, target)


def test_goodput_per_gpu():
    assert goodput_per_gpu(2.5, 2) == approx(1.25)
    assert goodput_per_gpu(GoodputResult(6.0), 4) == approx(1.5)
    with pytest.raises(ValueError):
        goodput_per_gpu(1.0, 0)


# --------------------------------------------------------------------------------------------
# arrivals


def test_poisson_arrivals_statistics():
    n, rate = 20_000, 4.0
    t = arrival_times(n, rate, burstiness=1.0, seed=0)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert t.shape == (n,) and np.all(gaps >= 0)
    # mean gap 1/rate = 0.25 s; std error 0.25/sqrt(20000) = 0.0018 (0.7%)
    assert gaps.mean() == approx(1 / rate, rel=0.03)
    # exponential gaps: coefficient of variation 1
    assert gaps.std() / gaps.mean() == approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.5, 4.0])
def test_gamma_arrivals_statistics(burstiness):
    n, rate = 20_000, 10.0
    gaps = np.diff(np.concatenate([[0.0], arrival_times(n, rate, burstiness, seed=1)]))
    assert gaps.mean() == approx(1 / rate, rel=0.04)  # mean independent of burstiness
    # gamma with shape b: CV = 1/sqrt(b) -> 1.414 (bursty) or 0.5 (regular)
    assert gaps.std() / gaps.mean() == approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_special_cases():
    assert np.array_equal(arrival_times(5, math.inf, 1.0, seed=0), np.zeros(5))
    assert arrival_times(4, 2.0, math.inf) == approx([0.5, 1.0, 1.5, 2.0])
    assert arrival_times(0, 2.0).shape == (0,)
    t = arrival_times(100, 5.0, 1.0, seed=3, normalize_total=True)
    assert t[-1] == approx(100 / 5.0)  # vllm's rescale: last arrival at num / rate
    assert np.array_equal(arrival_times(50, 3.0, 2.0, seed=7), arrival_times(50, 3.0, 2.0, seed=7))
    assert not np.array_equal(arrival_times(50, 3.0, seed=7), arrival_times(50, 3.0, seed=8))
    for bad in [dict(rate=0.0), dict(rate=-1.0), dict(rate=1.0, burstiness=0.0)]:
        with pytest.raises(ValueError):
            arrival_times(3, **{"burstiness": 1.0, **bad})


# --------------------------------------------------------------------------------------------
# datasets


def test_random_requests_ranges_and_avoid_ids():
    reqs = random_requests(500, 100, 20, 0.1, vocab_size=50, seed=0, avoid_ids={0, 1, 2})
    assert len(reqs) == 500
    # [floor(100*0.9), ceil(100*1.1)] = [90, 110] and [18, 22]
    prompt_lens = {r.prompt_len for r in reqs}
    output_lens = {r.output_len for r in reqs}
    assert min(prompt_lens) >= 90 and max(prompt_lens) <= 110
    assert min(output_lens) >= 18 and max(output_lens) <= 22
    assert len(prompt_lens) > 15 and len(output_lens) == 5  # spread over the range
    ids = np.concatenate([r.prompt_token_ids for r in reqs])
    assert ids.min() >= 3 and ids.max() <= 49  # 0, 1, 2 avoided; < vocab_size
    assert all(r.prompt is None and len(r.prompt_token_ids) == r.prompt_len for r in reqs)


def test_random_requests_fixed_lengths_and_seeding():
    reqs = random_requests(10, 64, 8, 0.0, vocab_size=1000, seed=5)
    assert {(r.prompt_len, r.output_len) for r in reqs} == {(64, 8)}
    assert reqs == random_requests(10, 64, 8, 0.0, vocab_size=1000, seed=5)
    assert reqs != random_requests(10, 64, 8, 0.0, vocab_size=1000, seed=6)
    with pytest.raises(ValueError):
        random_requests(1, 10, 10, 1.0, vocab_size=10)  # range_ratio must be < 1
    with pytest.raises(ValueError):
        random_requests(1, 10, 10, 0.0, vocab_size=2, avoid_ids=[0, 1])  # nothing left


def test_sharegpt_like_requests_lengths_and_seeding():
    reqs = sharegpt_like_requests(4000, vocab_size=1000, seed=0, max_len=2048)
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.output_len for r in reqs])
    assert p.min() >= 4 and o.min() >= 4 and (p + o).max() <= 2048
    # nominal means 161 / 338, slightly lowered by clipping
    assert 135 < p.mean() < 185 and 290 < o.mean() < 370
    assert np.median(p) < p.mean()  # right-skewed
    assert reqs == sharegpt_like_requests(4000, vocab_size=1000, seed=0, max_len=2048)
    tight = sharegpt_like_requests(500, vocab_size=100, seed=1, max_len=64)
    assert all(4 <= r.prompt_len and 4 <= r.output_len and r.prompt_len + r.output_len <= 64
               for r in tight)


class _StubTokenizer:
    """One token per whitespace-separated word; ids are word lengths."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def _conv(human: str, gpt: str) -> dict:
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def _words(n: int) -> str:
    return " ".join(["w"] * n)


def test_sharegpt_file_parsing_and_filtering(tmp_path):
    data = [
        _conv(_words(5), _words(6)),  # kept: 5 + 6
        _conv(_words(3), _words(10)),  # prompt < 4 -> dropped
        _conv(_words(10), _words(3)),  # output < 4 -> dropped
        _conv(_words(30), _words(30)),  # 60 > max_len 50 -> dropped
        {"conversations": []},  # no turns -> skipped
        {"conversations": [{"from": "gpt", "value": "hi"}]},  # no human turn -> skipped
        {"conversations": [  # first human turn, then first gpt turn after it: kept, 4 + 7
            {"from": "system", "value": _words(99)},
            {"from": "human", "value": _words(4)},
            {"from": "human", "value": _words(20)},
            {"from": "gpt", "value": _words(7)},
        ]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(path, 2, _StubTokenizer(), seed=0, max_len=50)
    assert sorted((r.prompt_len, r.output_len) for r in reqs) == [(4, 7), (5, 6)]
    for r in reqs:
        assert r.prompt == _words(r.prompt_len)
        assert r.prompt_token_ids == [1] * r.prompt_len
    # seeded order: same seed, same order
    assert reqs == sharegpt_requests(path, 2, _StubTokenizer(), seed=0, max_len=50)
    # only 2 usable entries
    with pytest.raises(ValueError, match="only 2 usable"):
        sharegpt_requests(path, 3, _StubTokenizer(), seed=0, max_len=50)
    # fixed output length 2 skips the output-length filter and replaces the completion length:
    # (10, 3) now counts as 10 + 2 and (30, 30) as 30 + 2 <= 50; the prompt < 4 entry still fails
    fixed = sharegpt_requests(path, 4, _StubTokenizer(), seed=0, max_len=50, fixed_output_len=2)
    assert sorted(r.prompt_len for r in fixed) == [4, 5, 10, 30]
    assert all(r.output_len == 2 for r in fixed)


def test_sharegpt_file_errors(tmp_path):
    tok = _StubTokenizer()
    with pytest.raises(FileNotFoundError, match="not found"):
        sharegpt_requests(tmp_path / "missing.json", 1, tok)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharegpt_requests(bad_json, 1, tok)
    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(not_list, 1, tok)
    no_conv = tmp_path / "noconv.json"
    no_conv.write_text(json.dumps([{"text": "hello"}]))
    with pytest.raises(ValueError, match="conversations"):
        sharegpt_requests(no_conv, 1, tok)
    bad_turn = tmp_path / "badturn.json"
    bad_turn.write_text(json.dumps([{"conversations": [{"from": "human"}]}]))
    with pytest.raises(ValueError, match="'from' and 'value'"):
        sharegpt_requests(bad_turn, 1, tok)


def test_sample_request_validation():
    with pytest.raises(ValueError):
        SampleRequest(None, None, 3, 3)
    with pytest.raises(ValueError):
        SampleRequest([1, 2], None, 3, 3)


# --------------------------------------------------------------------------------------------
# plots


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_attainment(
        {"hybrid": [(1, 1.0), (2, 0.95), (3, 0.85)], "rapid": [(1, 1.0), (2, 0.99), (3, 0.93)]},
        tmp_path / "sub" / "attainment.png",
        "SLO attainment",
    )
    _assert_png(out)

    runs = {
        mode: [(rate, compute_metrics(_records(), duration_s=rate)) for rate in (1.0, 2.0)]
        for mode in ("hybrid", "rapid")
    }
    _assert_png(plot_latency_percentiles(runs, tmp_path / "ttft.png", metric="ttft", slo_ms=250))
    with pytest.raises(KeyError):
        plot_latency_percentiles(runs, tmp_path / "x.png", metric="ttft", percentiles=(75,))

    frontier = {
        "hybrid": [(30.0, 8000.0, "chunk 256"), (45.0, 12000.0, "chunk 512")],
        "rapid": [(25.0, 10000.0, "SM 30%"), (35.0, 15000.0, "SM 50%")],
    }
    _assert_png(plot_frontier(frontier, tmp_path / "frontier.png", tpot_slo_ms=40))


# --------------------------------------------------------------------------------------------
# steady state: window, stability, goodput over stable rates, saturation, fresh traces, report

from types import SimpleNamespace  # noqa: E402

from rapid.bench.report import PLOTS_SKIPPED, write_markdown, write_plots  # noqa: E402
from rapid.bench.results import mode_summary, parse_slo_pairs, rate_result  # noqa: E402
from rapid.bench.steady import (  # noqa: E402
    UNFINISHED,
    StabilityCriteria,
    measured,
    saturation,
    stability,
    stable_goodput,
    window_throughput,
)
from rapid.bench.traces import build_traces, default_warmup_s, parse_rates, plan_rates, shared_first_blocks  # noqa: E402


def _run(rate=10.0, duration=60.0, ttft=lambda t: 0.1, decode_s=lambda t: 1.0, out_len=21, warm_ttft=None):
    """Synthetic records: evenly spaced arrivals; TTFT and decode time may depend on the arrival time t."""
    recs = []
    for i in range(int(rate * duration)):
        t = (i + 1) / rate
        first = warm_ttft if (warm_ttft is not None and t < 5) else ttft(t)
        gap = decode_s(t) / (out_len - 1)
        recs.append(RequestRecord(prompt_len=100, output_len=out_len, arrival_time=t, start_time=t, ttft=first,
                                  itl=[gap] * (out_len - 1), latency=first + decode_s(t)))
    return recs


def test_steady_queue_is_stable():
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 0.3, size=600)
    recs = _run(ttft=lambda t: 0.1 + noise[int(t * 10) - 1])
    v = stability(recs, 6.0, 60.0)
    assert v["stable"] is True and v["reasons"] == []
    assert abs(v["ttft_slope"]) < 0.01 and v["shortfall"] == approx(0.0, abs=0.03)


def test_growing_queue_is_unstable():
    # 20% overload: each second of arrivals adds 0.2 s of queueing before prefill
    v = stability(_run(ttft=lambda t: 0.1 + 0.2 * t), 6.0, 60.0)
    assert v["stable"] is False
    assert v["ttft_slope"] == approx(0.2, rel=1e-6)
    assert v["ttft_growth"] > 3 and any("TTFT rises" in r for r in v["reasons"])
    assert any("last third" in r for r in v["reasons"])


def test_slowing_decode_is_unstable_by_shortfall():
    # TTFT stays flat but decoding slows as the batch grows: fewer requests finish than arrive
    v = stability(_run(decode_s=lambda t: 1.0 + 0.3 * t), 6.0, 60.0)
    assert v["stable"] is False and v["ttft_slope"] == approx(0.0, abs=1e-9)
    assert v["shortfall"] > 0.05 and any("a server keeping up would finish" in r for r in v["reasons"])


def test_a_server_keeping_up_is_stable_through_random_lengths_and_a_drifting_rate():
    # session 14's false alarm: 20 s of arrivals whose rate drifted from 36 to 44 req/s, ShareGPT-like output
    # lengths, time per token growing 1% a second with the load and +-20% per request. The old estimate (arrivals
    # shifted by the median latency) read this seed 7% short; each request's own length at the mean rates does not
    rng = np.random.default_rng(11)
    t, recs = 0.0, []
    while t < 20.0:
        t += rng.exponential(1 / (36 + 0.4 * t))
        out = int(np.clip(rng.lognormal(5.2, 0.9), 2, 512))
        gap = 0.01 * (1 + 0.01 * t) * rng.uniform(0.8, 1.2)
        recs.append(RequestRecord(prompt_len=100, output_len=out, arrival_time=t, start_time=t, ttft=0.03,
                                  itl=[gap] * (out - 1), latency=0.03 + gap * (out - 1)))
    v = stability(recs, 5.0, 20.0)
    assert v["stable"] is True and 0 < v["shortfall"] < 0.05
    assert v["offered_rate"] == approx(sum(5 <= r.arrival_time <= 20 for r in recs) / 15)


def test_unfinished_requests_make_a_rate_unstable_and_few_requests_no_verdict():
    recs = _run()
    recs[300].success, recs[300].error = False, UNFINISHED
    v = stability(recs, 6.0, 60.0)
    assert v["stable"] is False and v["unfinished"] == 1 and "drain deadline" in v["reasons"][0]
    few = stability(_run(rate=1.0, duration=8.0), 6.0, 8.0)
    assert few["stable"] is None and "only 3 requests" in few["reasons"][0]
    with pytest.raises(ValueError, match="max_ttft_slope must be > 0, got 0"):
        StabilityCriteria(max_ttft_slope=0)


def test_warmup_requests_are_excluded():
    # the first 5 s see a cold engine (TTFT 10 s); none of them may reach the statistics
    recs = _run(warm_ttft=10.0)
    meas = measured(recs, 5.0, 60.0)
    assert len(meas) == 551 and min(r.arrival_time for r in meas) == 5.0
    r = rate_result(recs, 10.0, 60.0, 5.0, 62.0, {"ttft": 1000.0, "tpot": 50.0}, [(1000.0, 50.0)])
    assert r["excluded_warmup"] == 49 and r["completed"] == 551 and r["num_prompts"] == 600
    assert r["p99_ttft_ms"] == approx(100.0) and r["slo_attainment"] == 1.0 and r["attainment"]["1000/50"] == 1.0
    assert r["duration"] == 55.0 and r["stability"]["stable"] is True
    assert r["request_goodput"] == approx(r["request_throughput"]) and len(r["records"][0]) == 6


def test_window_throughput_counts_only_what_was_served_inside_the_window():
    recs = _run(rate=10.0, duration=60.0)  # every request: 21 tokens over 1.1 s, latency 1.1 s
    w = window_throughput(recs, 10.0, 60.0)
    assert w["offered_rate"] == approx(10.0, rel=0.01) and w["served_rate"] == approx(10.0, rel=0.01)
    assert w["output_throughput"] == approx(210.0, rel=0.01)
    # a burst that drains after the window: served far below offered
    burst = _run(rate=10.0, duration=60.0, decode_s=lambda t: 1.0 + t)
    assert window_throughput(burst, 10.0, 60.0)["served_rate"] < 6.0
    with pytest.raises(ValueError, match="warmup_s=60, end_s=60"):
        window_throughput(recs, 60, 60)


def test_goodput_ignores_unstable_rates():
    # rate 8's attainment (0.99) was measured on a growing queue: it must not lift the goodput to 8
    assert goodput_rate([1, 2, 4, 8], [1.0, 1.0, 0.95, 0.99]).rate == 8
    g = stable_goodput([1, 2, 4, 8], [1.0, 1.0, 0.95, 0.99], [True, True, True, False])
    assert g == {"rate": 4, "is_lower_bound": True, "below_range": False, "upper_bound": 8, "rates_used": [1, 2, 4]}
    g = stable_goodput([1, 2, 4, 8], [1.0, 0.95, 0.85, 0.99], [True, True, True, False])
    assert g["rate"] == approx(3.0) and not g["is_lower_bound"]  # 2 + (0.95 - 0.9) / 0.1 * 2
    # a stable rate above an unstable one (noise) is not used; no stable rate: below range
    assert stable_goodput([2, 4, 8], [1.0, 1.0, 1.0], [True, False, True])["rates_used"] == [2]
    assert stable_goodput([2, 4], [1.0, 1.0], [False, None])["below_range"]
    with pytest.raises(ValueError, match="2 rates, 2 attainments, 1 verdicts"):
        stable_goodput([1, 2], [1, 1], [True])


def test_saturation_is_the_highest_stable_rate():
    s = saturation([2, 4, 8, 16], [True, True, False, True], [100.0, 200.0, 300.0, 310.0])
    assert s == {"request_rate": 4, "output_throughput": 200.0, "is_lower_bound": False, "first_unstable_rate": 8}
    assert saturation([2, 4], [True, True], [1.0, 2.0])["is_lower_bound"] is True
    assert saturation([2], [False], [1.0])["request_rate"] is None


def test_mode_summary_and_markdown_mark_unstable_rates(tmp_path, monkeypatch):
    slos = {"ttft": 1000.0, "tpot": 50.0}
    pairs = parse_slo_pairs("1000/50,500/25")
    per_rate = [rate_result(_run(rate=r, ttft=ttft), r, 60.0, 6.0, 61.0, slos, pairs)
                for r, ttft in ((5.0, lambda t: 0.1), (10.0, lambda t: 0.1), (20.0, lambda t: 0.1 + 0.1 * t))]
    entry = mode_summary(per_rate, 1, pairs)
    assert [p["stability"]["stable"] for p in per_rate] == [True, True, False]
    assert entry["goodput_rps"] == 10.0 and entry["goodput_upper_bound_rps"] == 20.0
    assert entry["goodput_by_slo"]["500/25"]["below_range"]  # TPOT 50 ms misses 25 ms at every rate
    assert entry["saturation"]["request_rate"] == 10.0 and entry["saturation"]["output_throughput"] > 0
    summary = {"device": "cpu", "command": "rapid bench serve", "slos_ms": slos, "slo_pairs": ["1000/50", "500/25"],
               "method": {"duration_text": "60 s", "warmup_text": "6 s", "arrivals": "Poisson", "dataset": "random",
                          "seeds": {"5": 0}, "shared_first_blocks": 0, "stability_rule": "rule"},
               "modes": {"hybrid": entry}}
    per_rate[0]["engine"] = {"placement_policy": "adaptive", "preemptions": 0, "device_time": {},
                             "prefill_tokens_by_lane": {"decode": 10, "prefill": 90},
                             "placement_learned": {"decode_alone_ms": 9.5, "decode_us_per_prompt_token:prefill": 18.25},
                             "prefill_batches_by_reason": {"decode: mixed step: cheaper": 3, "prefill: measuring": 7}}
    md = write_markdown(summary, tmp_path / "serve.md").read_text()
    assert "- prefill batches by the placement's lane and reason: 5 req/s prefill: measuring 7, decode: mixed step: " \
        "cheaper 3" in md  # the most frequent first
    assert "**UNSTABLE**" in md and "< 20 req/s (unstable there)" in md and "sustains 10 req/s" in md
    assert "measured costs at each rate's last arrival" in md \
        and "5 req/s decode_alone_ms 9.5, decode_us_per_prompt_token:" \
        "prefill 18.25" in md
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    assert write_plots(summary, tmp_path) == PLOTS_SKIPPED and "'.[bench]'" in PLOTS_SKIPPED
    assert not list(tmp_path.glob("*.png"))
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    for png in write_plots(summary, tmp_path):
        _assert_png(png)


def test_plan_rates_and_warmup_defaults():
    plans = plan_rates(parse_rates("2,4"), seed=7, duration_s=60.0)
    assert [(p.num_prompts, p.seed, p.duration_s, p.warmup_s) for p in plans] == [(120, 7, 60.0, 6.0), (240, 8, 60.0, 6.0)]
    assert default_warmup_s(20.0) == 5.0 and default_warmup_s(3.0) == 0.75 and default_warmup_s(100.0) == 10.0
    over = plan_rates([2.0, math.inf], seed=0, duration_s=None, num_prompts=10, warmup_s=1.0)
    assert [(p.num_prompts, p.duration_s, p.warmup_s) for p in over] == [(10, 5.0, 1.0), (10, 0.0, 0.0)]
    with pytest.raises(ValueError, match="give --num-prompts"):
        plan_rates([math.inf], seed=0, duration_s=60.0)
    with pytest.raises(ValueError, match=r"--warmup-s 70 must be in \[0, 60\)"):
        plan_rates([1.0], seed=0, duration_s=60.0, warmup_s=70)
    with pytest.raises(ValueError, match="repeats"):
        parse_rates("1,1")
    with pytest.raises(ValueError, match="TTFT_MS/TPOT_MS"):
        parse_slo_pairs("1000")


@pytest.mark.parametrize("dataset", ["random", "sharegpt-like"])
def test_every_rate_gets_prompts_the_engine_has_never_seen(dataset):
    args = SimpleNamespace(dataset_name=dataset, random_input_len=64, random_output_len=8, random_range_ratio=0.0,
                           dataset_path=None)
    plans = plan_rates([1.0, 2.0], seed=0, duration_s=30.0)
    vocab = 320  # the tiny test model's: the smallest vocabulary these traces meet
    warm, (rate1, rate2) = build_traces(args, plans, vocab, 2048)
    assert [p.seed for p in plans] == [0, 1] and len(rate1) == 30 and len(rate2) == 60
    first1 = {tuple(r.prompt_token_ids[:16]) for r in rate1 if r.prompt_len >= 16}
    assert len(first1) > 20
    assert not any(tuple(r.prompt_token_ids[:16]) in first1 for r in rate2)  # no first block of rate 2 seen at rate 1
    assert shared_first_blocks([warm, rate1, rate2], 16) == 0
    assert shared_first_blocks([rate1, rate1], 16) == len(first1)  # the check does see a replayed trace


def test_replay_calls_its_hook_once_at_the_last_arrival_before_the_queue_drains():
    """`rapid bench serve` reads the placement policy's costs at a trace's last arrival: after the drain they were
    those of the few small batches at its end. The hook runs once, after every request was sent and before any of
    the last ones finished."""
    import types

    from rapid.bench.datasets import SampleRequest
    from rapid.bench.replay import replay_inproc
    from rapid.protocol.engine import RequestDelta

    class Engine:
        def __init__(self):
            self.sent, self.steps, self.seen_at_hook = [], 0, None

        def add_request(self, req):
            self.sent.append(req.request_id)

        def get_deltas(self, timeout_s=None):
            self.steps += 1
            if self.steps % 3:
                return []
            done, self.sent = self.sent, []
            return [RequestDelta(rid, [7], "", finished=True) for rid in done]

        def abort(self, rids):
            pass

    engine = Engine()
    calls = []
    trace = [SampleRequest(prompt_token_ids=[1, 2, 3], prompt=None, prompt_len=3, output_len=1) for _ in range(5)]
    llm = types.SimpleNamespace(engine=engine, tokenizer=None)
    records, _ = replay_inproc(llm, trace, [0.0, 0.0, 0.01, 0.02, 0.03], True,
                               at_last_arrival=lambda: calls.append(list(engine.sent)))
    assert len(calls) == 1 and calls[0][-1].endswith("-4")  # once, with the last request sent and not yet done
    assert all(r.success and r.output_len == 1 for r in records)

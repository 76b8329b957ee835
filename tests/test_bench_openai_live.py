"""`rapid bench serve --backend openai` against a real `rapid serve` (a subprocess on the tiny model, CPU), and the
same command in process (--backend inproc): the request counts, the successes, positive TTFT/ITL/TPOT/E2E, the
output lengths the server's usage (and its /metrics) reported, and the same JSON keys and method from both."""

import json
import re
import signal
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rapid.bench.datasets import random_requests
from rapid.bench.openai_backend import _token_event, completion_payload, replay_openai
from rapid.bench.traces import WARMUP_REQUESTS
from rapid.entrypoints.cli import main

pytestmark = pytest.mark.slow

MAX_LEN = 256
INPUT_LEN, OUTPUT_LEN, WARMUP_TOKENS = 32, 6, 4
RATES = {"2": 6, "4": 12}  # rate -> prompts over 3 s
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def bench_args(backend: str, model, result_dir, *extra) -> list[str]:
    return ["bench", "serve", "--backend", backend, "--model", str(model), "--max-model-len", str(MAX_LEN),
            "--duration-s", "3", "--request-rates", ",".join(RATES), "--dataset-name", "random",
            "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN), "--ignore-eos",
            "--goodput", "ttft:5000", "tpot:1000", "--slo-pairs", "5000/1000", "--result-dir", str(result_dir),
            *extra]


def counters(url: str) -> dict:
    """The server's counters (name{finished_reason} for the per-reason ones)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name.endswith("_total") or s.name.endswith("_count"):
                reason = s.labels.get("finished_reason")
                out[s.name + (f"{{{reason}}}" if reason else "")] = s.value
    return out


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.fixture(scope="module")
def live_server(tiny_llama, tmp_path_factory):
    """`rapid serve` as a user starts it (HTTP only, a free port); stopped by SIGTERM, which must exit 0."""
    log = tmp_path_factory.mktemp("rapid-serve") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", "--model", str(tiny_llama),
                                 "--max-model-len", str(MAX_LEN), "--port", "0", "--no-zmq",
                                 "--shutdown-grace-s", "0.3"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://\S+)/v1", line)
        assert m, f"no URL in {line!r}; stderr: {log.read_text()[-3000:]}"
        yield m.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "RAPID server stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def vocab(model) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


def test_stream_carries_the_usage_the_bench_reads(live_server, tiny_llama):
    """The contract openai_backend relies on: token chunks, then one usage chunk (no choices) with the counts."""
    req = random_requests(1, INPUT_LEN, OUTPUT_LEN, 0.0, vocab(tiny_llama), seed=99)[0]
    body = completion_payload(req, str(tiny_llama), OUTPUT_LEN, ignore_eos=True)
    with httpx.stream("POST", live_server + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        data = [ln[len("data:"):].strip() for ln in r.iter_lines() if ln.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == OUTPUT_LEN and usage[0]["prompt_tokens"] == INPUT_LEN
    assert 1 <= sum(_token_event(ch) for c in chunks for ch in c.get("choices") or []) <= OUTPUT_LEN
    assert [c.get("choices") for c in chunks].count([]) == 1 and chunks[-1]["choices"] == []  # usage comes last


def test_bench_serve_openai_against_rapid_serve_matches_inproc(live_server, tiny_llama, tmp_path):
    before = counters(live_server)
    assert main(bench_args("openai", tiny_llama, tmp_path / "openai", "--base-url", live_server)) == 0
    after = counters(live_server)
    live = json.loads((tmp_path / "openai" / "serve.json").read_text())
    assert live["device"] == f"OpenAI-compatible server at {live_server}" and live["method"]["backend"] == "openai"
    assert list(live["modes"]) == ["hybrid"]  # --mode's default labels the server
    per_rate = live["modes"]["hybrid"]["per_rate"]
    assert [f"{r['request_rate']:g}" for r in per_rate] == list(RATES)
    assert live["method"]["num_prompts"] == RATES

    sent = 0
    for r in per_rate:
        n = RATES[f"{r['request_rate']:g}"]
        recs = r["records"]  # [prompt_len, output_len, ttft, e2e, success, arrival]
        assert r["num_prompts"] == len(recs) == n
        assert r["completed"] + r["excluded_warmup"] == n and r["failed"] == 0 and r["completed"] > 0
        assert all(rec[4] is True for rec in recs), recs
        assert all(rec[0] == INPUT_LEN and rec[1] == OUTPUT_LEN for rec in recs), recs
        assert all(0 < rec[2] <= rec[3] for rec in recs), recs
        assert r["total_output_tokens"] == OUTPUT_LEN * r["completed"]
        assert r["total_input_tokens"] == INPUT_LEN * r["completed"]
        for metric in LATENCIES:
            for stat in ("mean", "median", "p99"):
                assert r[f"{stat}_{metric}_ms"] > 0, (metric, stat, r)
        assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
        assert r["output_throughput"] > 0 and r["request_throughput"] > 0
        sent += n

    # what the server saw: every request sent (the warm-up too) finished by length, with the tokens the bench counted
    sent += WARMUP_REQUESTS
    generated = sum(rec[1] for r in per_rate for rec in r["records"]) + WARMUP_REQUESTS * WARMUP_TOKENS
    assert delta(after, before, "rapid:request_success_total{length}") == sent
    assert sum(delta(after, before, k) for k in after if k.startswith("rapid:request_success_total")) == sent
    assert delta(after, before, "rapid:e2e_request_latency_seconds_count") == sent
    assert delta(after, before, "rapid:generation_tokens_total") == generated
    assert delta(after, before, "rapid:prompt_tokens_total") == sent * INPUT_LEN

    # the same command in process: the same JSON shape and method (bar the backend), the same trace
    assert main(bench_args("inproc", tiny_llama, tmp_path / "inproc")) == 0
    ref = json.loads((tmp_path / "inproc" / "serve.json").read_text())
    assert set(live) == set(ref) and set(live["modes"]) == set(ref["modes"])
    assert set(live["method"]) == set(ref["method"])
    assert {k: v for k, v in live["method"].items() if k != "backend"} == {
        k: v for k, v in ref["method"].items() if k != "backend"}
    assert ref["method"]["backend"] == "inproc"
    live_mode, ref_mode = live["modes"]["hybrid"], ref["modes"]["hybrid"]
    assert set(live_mode) == set(ref_mode)
    assert set(live_mode["goodput_by_slo"]) == set(ref_mode["goodput_by_slo"])
    assert len(live_mode["per_rate"]) == len(ref_mode["per_rate"])
    for a, b in zip(live_mode["per_rate"], ref_mode["per_rate"]):
        assert set(b) - set(a) == {"engine"} and set(a) <= set(b), set(a) ^ set(b)  # in process: engine counters
        assert set(a["stability"]) == set(b["stability"]) and set(a["attainment"]) == set(b["attainment"])
        assert a["num_prompts"] == b["num_prompts"] and a["seed"] == b["seed"]
        # the same prompts at the same arrivals, the same output lengths
        assert [(x[0], x[1], x[5]) for x in a["records"]] == [(y[0], y[1], y[5]) for y in b["records"]]


def test_every_token_is_a_timed_event(live_server, tiny_llama):
    """What the in-process replay records: one TTFT and output_len - 1 inter-token gaps per request."""
    trace = random_requests(8, INPUT_LEN, OUTPUT_LEN, 0.0, vocab(tiny_llama), seed=0)
    records, _ = replay_openai(live_server, trace, [0.25 * i for i in range(len(trace))], True,
                               model=str(tiny_llama), drain_timeout_s=30)
    assert all(r.success and r.output_len == OUTPUT_LEN for r in records)
    assert [len(r.itl) for r in records] == [OUTPUT_LEN - 1] * len(records)

"""The HTTP server's request gauges and counters against a real engine on the CPU (a tiny model, a KV pool small
enough to preempt): a preempted request counts as waiting until it is scheduled again, and every gauge ends at 0.
The per-request metrics fed synthetic deltas are in test_request_metrics.py."""

import random
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rapid import LLM, SamplingParams
from rapid.entrypoints.frontend import EngineFrontend
from rapid.entrypoints.openai.api_server import build_app
from rapid.entrypoints.openai.http_server import HttpServer
from rapid.entrypoints.openai.metrics import ServerMetrics
from tiny import wait_until

LABELS = {"model_name": "tiny"}


@pytest.fixture(scope="module")
def small_pool(tiny_llama):
    """10 blocks of 16 tokens: two of the requests below decoding at once overflow it (preemption by recompute)."""
    with LLM(tiny_llama, kv_cache_memory_bytes=10 * 8192, enable_prefix_caching=False) as llm:
        assert llm.engine.num_blocks == 10
        yield llm


def served(llm, **frontend_kwargs):
    frontend = EngineFrontend(llm, **frontend_kwargs)
    return frontend, HttpServer(build_app(frontend, model_name="tiny"), port=0).start()


def scrape(url: str) -> dict[str, float]:
    """Sample name -> value; request_success by its finished_reason ("name{reason}"); no histogram buckets."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if "le" not in s.labels:
                out[s.name + (f"{{{s.labels['finished_reason']}}}" if "finished_reason" in s.labels else "")] = s.value
    return out


def test_preempted_requests_count_as_waiting_and_the_gauges_end_at_zero(small_pool):
    """Eight requests at once through HTTP on a pool that holds two: the engine preempts some. After every delta
    (seen by an observer after a tracker's metrics took it) running + waiting is the number of requests in the
    engine, and running is the number scheduled and not preempted since (a preempted request used to stay counted
    as running until it ended). Once all finished, every gauge is 0."""
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 300) for _ in range(n)] for n in (17, 33, 64, 90) * 2]
    frontend, server = served(small_pool)
    mine = ServerMetrics("tiny", "hybrid")  # no engine-stats collector: readable on the engine loop's thread
    state = {"live": 0, "scheduled": set(), "preempted": set(), "seen": 0}
    moments = []  # (in the engine, scheduled and not preempted, preempted now, waiting, running) after each delta

    class Check:
        def __init__(self, *_):
            state["live"] += 1

        def on_delta(self, d):
            rid, scheduled, preempted = d.request_id, state["scheduled"], state["preempted"]
            if d.finished or d.error is not None:
                state["live"] -= 1
                scheduled.discard(rid)
                preempted.discard(rid)
            elif d.preempted:
                preempted.add(rid)
                state["seen"] += 1
            elif d.first_scheduled_time:
                scheduled.add(rid)
                preempted.discard(rid)
            value = mine.registry.get_sample_value
            moments.append((state["live"], len(scheduled - preempted), len(preempted),
                            value("rapid:num_requests_waiting", LABELS), value("rapid:num_requests_running", LABELS)))

    frontend.observe_requests(mine.track)
    frontend.observe_requests(Check)  # (after mine: it sees each delta once mine counted it)
    before = small_pool.engine.get_stats().num_preemptions
    try:
        def one(p):
            r = httpx.post(server.url + "/v1/completions", timeout=120,
                           json={"prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert wait_until(lambda: frontend.num_pending == 0, timeout=10)
        got = scrape(server.url)
    finally:
        server.stop()
        frontend.close()
    assert small_pool.engine.get_stats().num_preemptions > before, "the KV pool was meant to force preemption"
    assert state["seen"] > 0, "the engine never said it preempted a request"
    assert moments and all(waiting + running == live for live, _, _, waiting, running in moments), moments
    assert all(running == runs for _, runs, _, _, running in moments), moments  # preempted ones are not running
    assert any(preempted and waiting >= preempted for _, _, preempted, waiting, _ in moments)
    assert got["rapid:num_requests_running"] == got["rapid:num_requests_waiting"] == 0
    assert got["rapid:request_success_total{length}"] == len(prompts)
    assert mine.registry.get_sample_value("rapid:num_requests_running", LABELS) == 0
    assert mine.registry.get_sample_value("rapid:num_requests_waiting", LABELS) == 0


def test_a_refused_request_records_nothing_and_leaves_nothing_in_the_engine(small_pool):
    """n=3 where the frontend admits 2 requests in flight: a 400 (no retry can succeed), and none of its choices
    reaches the engine or the metrics (its first choices used to be queued, then aborted, and counted:
    request_success{abort}, e2e latency, the per-request histograms). A request of n=2, which fits, is then served
    and counted."""
    frontend, server = served(small_pool, max_pending=2)
    body = {"prompt": "Paris is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    try:
        before = scrape(server.url)
        for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                                           "content": "hi"}]})):
            r = httpx.post(server.url + path, json=body | extra | {"n": 3}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            assert "these are 3 requests (prompts x n), more than this server holds at once (--max-pending 2)" in \
                r.json()["error"]["message"]
        time.sleep(0.5)  # what the engine loop would have done with queued choices (add, then abort) is done
        assert frontend.num_pending == 0 and frontend.get_stats().num_requests == 0  # nothing left in the engine
        refused = scrape(server.url)
        r = httpx.post(server.url + "/v1/completions", json=body | {"n": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert wait_until(lambda: frontend.num_pending == 0, timeout=10)
        served_two = scrape(server.url)
    finally:
        server.stop()
        frontend.close()
    counted = [name for name in refused if name.startswith("rapid:request_success_total") or name.endswith("_count")]
    assert counted and all(refused[name] == before.get(name, 0) == 0 for name in counted), refused
    assert refused["rapid:num_requests_running"] == refused["rapid:num_requests_waiting"] == 0
    assert served_two["rapid:request_success_total{length}"] == 2
    assert served_two["rapid:e2e_request_latency_seconds_count"] == 2
    assert served_two["rapid:request_params_n_count"] == 1 and served_two["rapid:request_generation_tokens_sum"] == 8


def test_a_request_that_does_not_fit_beside_those_in_flight_gets_a_429(small_pool):
    """With 1 of 2 requests in flight, n=2 gets OpenAI's 429 (retry later); once the first is done, it is served."""
    frontend, server = served(small_pool, max_pending=2)
    gate = threading.Event()
    try:  # the held request's deltas wait on the gate, so it stays in flight until the 429 has been given
        frontend.submit("held", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), lambda d: gate.wait(30))
        body = {"prompt": "Paris is", "max_tokens": 2, "n": 2}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
        assert "1 requests are in flight and these add 2 (the limit is 2); retry later" in r.json()["error"]["message"]
        gate.set()
        assert wait_until(lambda: frontend.num_pending == 0, timeout=30)
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    finally:
        gate.set()
        server.stop()
        frontend.close()


def test_request_success_has_every_finished_reason_at_zero_from_the_start():
    """vLLM's series exist before any request ends, so rate() and absent() see them from the start."""
    families = text_string_to_metric_families(ServerMetrics("tiny", "hybrid").render().decode())
    success = {s.labels["finished_reason"]: s.value for fam in families for s in fam.samples
               if s.name == "rapid:request_success_total"}
    assert success == {"stop": 0, "length": 0, "abort": 0, "error": 0}

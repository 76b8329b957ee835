"""The server's per-request metrics (rapid.entrypoints.openai.metrics) fed synthetic RequestDeltas: a request is
waiting until the engine says it scheduled it (RequestDelta.first_scheduled_time), running from then on, prefill
included; vLLM's per-request histograms (queue, prefill, decode, inference, time per output token, tokens, params)
are observed once when it ends. No engine, no server: the HTTP side is in test_http_server.py."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rapid.entrypoints.openai.metrics import ServerMetrics, token_buckets
from rapid.params import SamplingParams
from rapid.protocol.engine import RequestDelta

PHASES = ("queue", "prefill", "decode", "inference")


def scrape(m: ServerMetrics) -> dict[str, float]:
    """Sample name -> value ("name[le]" for a bucket); request_success by its finished_reason label."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            key = s.name + (f"[{s.labels['le']}]" if "le" in s.labels else "")
            key += f"{{{s.labels['finished_reason']}}}" if "finished_reason" in s.labels else ""
            out[key] = s.value
    return out


def gauges(m: ServerMetrics) -> tuple[float, float]:
    got = scrape(m)
    return got["rapid:num_requests_waiting"], got["rapid:num_requests_running"]


def delta(new=(), **fields) -> RequestDelta:
    return RequestDelta("r", list(new), "x" * len(new), arrival_time=100.0, **fields)


def test_waiting_turns_running_when_the_request_is_scheduled_not_at_its_first_token():
    m = ServerMetrics("m", "rapid")
    t = m.track(4, SamplingParams(max_tokens=3))
    assert gauges(m) == (1, 0)
    t.on_delta(delta())  # nothing said about scheduling yet
    assert gauges(m) == (1, 0)
    t.on_delta(delta(first_scheduled_time=100.5))  # in a prefill batch: prefilling counts as running (as vLLM)
    assert gauges(m) == (0, 1)
    assert scrape(m)["rapid:time_to_first_token_seconds_count"] == 0
    t.on_delta(delta([7], first_scheduled_time=100.5, first_token_time=101.0, last_token_time=101.0))
    assert gauges(m) == (0, 1)
    t.on_delta(delta([8, 9], first_scheduled_time=100.5, first_token_time=101.0, last_token_time=103.0,
                     finished=True, finish_reason="length"))
    assert gauges(m) == (0, 0)
    got = scrape(m)
    want = {"queue": 0.5, "prefill": 0.5, "decode": 2.0, "inference": 2.5}
    for phase, seconds in want.items():
        assert got[f"rapid:request_{phase}_time_seconds_count"] == 1
        assert got[f"rapid:request_{phase}_time_seconds_sum"] == pytest.approx(seconds)
    assert got["rapid:request_time_per_output_token_seconds_sum"] == pytest.approx(1.0)  # 2 s / (3 - 1) tokens
    assert got["rapid:request_time_per_output_token_seconds_count"] == 1
    assert got["rapid:time_to_first_token_seconds_sum"] == pytest.approx(1.0)
    assert got["rapid:request_prompt_tokens_sum"] == 4 and got["rapid:request_prompt_tokens_count"] == 1
    assert got["rapid:request_prompt_tokens_bucket[2.0]"] == 0 and got["rapid:request_prompt_tokens_bucket[5.0]"] == 1
    assert got["rapid:request_generation_tokens_sum"] == 3 and got["rapid:request_generation_tokens_count"] == 1
    assert got["rapid:request_params_max_tokens_sum"] == 3 and got["rapid:request_params_max_tokens_count"] == 1
    assert got["rapid:request_success_total{length}"] == 1
    t.on_delta(delta([5], finished=True, finish_reason="stop"))  # after its end: ignored
    assert scrape(m)["rapid:request_generation_tokens_sum"] == 3 and gauges(m) == (0, 0)


def test_an_engine_that_does_not_say_when_it_scheduled_turns_running_at_the_first_token():
    """first_scheduled_time 0 (an older engine peer): running from the first token; no queue, prefill or inference
    time to observe, the rest as usual. One token: time per output token 0, as vLLM's."""
    m = ServerMetrics("m", "rapid")
    t = m.track(2)
    t.on_delta(delta())
    assert gauges(m) == (1, 0)
    t.on_delta(delta([7], first_token_time=101.0, last_token_time=101.0))
    assert gauges(m) == (0, 1)
    t.on_delta(delta(finished=True, finish_reason="stop"))
    got = scrape(m)
    assert gauges(m) == (0, 0)
    for phase in ("queue", "prefill", "inference"):
        assert got[f"rapid:request_{phase}_time_seconds_count"] == 0
    assert got["rapid:request_decode_time_seconds_count"] == 1 and got["rapid:request_decode_time_seconds_sum"] == 0
    assert got["rapid:request_time_per_output_token_seconds_count"] == 1
    assert got["rapid:request_time_per_output_token_seconds_sum"] == 0
    assert got["rapid:request_params_max_tokens_count"] == 0  # not known to this tracker
    assert got["rapid:request_generation_tokens_sum"] == 1


def test_requests_aborted_while_queued_and_while_prefilling():
    """Aborted before scheduling: it leaves the waiting count, with token histograms (0 generated) but no phase;
    aborted while prefilling: it leaves the running count, with its queue time only."""
    m = ServerMetrics("m", "rapid")
    queued, prefilling = m.track(3), m.track(5)
    assert gauges(m) == (2, 0)
    prefilling.on_delta(delta(first_scheduled_time=100.25))
    assert gauges(m) == (1, 1)
    queued.close()  # the client went away
    assert gauges(m) == (0, 1)
    prefilling.on_delta(delta(first_scheduled_time=100.25, finished=True, finish_reason="abort"))
    got = scrape(m)
    assert gauges(m) == (0, 0) and got["rapid:request_success_total{abort}"] == 2
    assert got["rapid:request_queue_time_seconds_count"] == 1
    assert got["rapid:request_queue_time_seconds_sum"] == pytest.approx(0.25)
    for phase in ("prefill", "decode", "inference"):
        assert got[f"rapid:request_{phase}_time_seconds_count"] == 0
    assert got["rapid:request_prompt_tokens_count"] == 2 and got["rapid:request_prompt_tokens_sum"] == 8
    assert got["rapid:request_generation_tokens_count"] == 2 and got["rapid:request_generation_tokens_sum"] == 0


def test_request_params_n_and_the_token_buckets():
    m = ServerMetrics("m", "rapid", max_model_len=100)
    m.observe_request_n(1)
    m.observe_request_n(3)
    got = scrape(m)
    assert got["rapid:request_params_n_count"] == 2 and got["rapid:request_params_n_sum"] == 4
    assert got["rapid:request_params_n_bucket[2.0]"] == 1 and got["rapid:request_params_n_bucket[5.0]"] == 2
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100) and token_buckets(1) == (1,)
    assert "rapid:request_prompt_tokens_bucket[100.0]" in got and "rapid:request_prompt_tokens_bucket[200.0]" not in got


def test_a_preempted_request_counts_as_waiting_until_a_batch_takes_it_again():
    """The engine core says when it preempts a request (RequestDelta.preempted, in a delta of its own) and when a
    batch takes it again; the server's gauges follow: running while scheduled, waiting while preempted (as vLLM's
    scheduler puts it back in its waiting queue), running again once recomputed, nothing counted once it ended. The
    flag crosses the engine-core process's socket (msgspec) and an older core's delta without it still decodes."""
    import msgspec

    from fakes import add, finish_prefill, make_core
    from rapid.protocol.engine import CoreOutput, EngineOutputs
    from rapid.protocol.worker import DecodeStep, Dropped, SampledToken, StopDecode

    m = ServerMetrics("m", "rapid")
    core, w = make_core(num_blocks=9, lookahead=1)
    trackers = {}
    for rid in ("a", "b"):
        add(core, rid, n_prompt=8, max_tokens=20)
        trackers[rid] = m.track(8)
    assert gauges(m) == (2, 0)

    def feed():
        """Every delta so far to its request's tracker (through the core process's encoding); the flags seen."""
        seen = []
        for d in core.take_deltas():
            raw = msgspec.msgpack.encode(EngineOutputs([d]))
            (d,) = msgspec.msgpack.decode(raw, type=CoreOutput).deltas
            trackers[d.request_id].on_delta(d)
            seen.append((d.request_id, d.preempted))
        return seen

    core.dispatch()
    finish_prefill(core, w)
    feed()
    assert gauges(m) == (0, 2)
    stopped = []
    for t in range(12):  # decode until the pool runs out: b, the newest, is preempted
        running = [rid for rid, r in core.requests.items() if r.status.name == "DECODING"]
        core.deliver(DecodeStep([SampledToken(r, 20 + t, -1.0) for r in running], [], 0.0, 1.0))
        stopped = [msg for msg in w.decode if isinstance(msg, StopDecode)]
        if stopped:
            break
    assert stopped and stopped[0].request_ids == ["b"]
    assert ("b", True) in feed()
    assert gauges(m) == (1, 1)  # b waits again, although the executor still has to let go of it
    core.deliver(Dropped(["b"]))
    assert ("b", True) not in feed() and gauges(m) == (1, 1)  # back in the queue: no second word, still waiting
    core.abort(["a"])  # room for b again
    core.deliver(Dropped(["a"]))
    assert any(x.request_id == "b" for x in w.prefill[-1].work)  # a batch took b again ...
    assert ("b", False) in feed() and gauges(m) == (0, 1)  # ... so it runs again (a is gone)
    finish_prefill(core, w)
    core.abort(["b"])
    core.deliver(Dropped(["b"]))
    feed()
    got = scrape(m)
    assert gauges(m) == (0, 0) and got["rapid:request_success_total{abort}"] == 2
    fields = msgspec.msgpack.decode(msgspec.msgpack.encode(RequestDelta("r", [], "", first_scheduled_time=1.0)))
    old = msgspec.msgpack.encode(fields[:-1])  # one field fewer (no flag), as an older core sends
    assert not msgspec.msgpack.decode(old, type=RequestDelta).preempted


def test_engine_gauges_keep_their_last_value_while_the_engine_loop_is_busy():
    """A scrape during a long engine step (get_stats times out) shows the last figures, not a gap; a dead engine
    drops them."""
    from prometheus_client.parser import text_string_to_metric_families

    from rapid.engine.client import EngineDeadError
    from rapid.protocol.engine import Stats

    answers = [Stats([], [], [], [], num_free_blocks=25, num_blocks=100), TimeoutError(), EngineDeadError("down")]

    def get_stats():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    m = ServerMetrics("m", "rapid", get_stats=get_stats, stats_interval_s=0)

    def kv_usage():
        return [s.value for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples
                if s.name == "rapid:kv_cache_usage_perc"]

    assert kv_usage() == [0.75]
    assert kv_usage() == [0.75]  # the engine loop did not answer in time: the previous figure stands
    assert kv_usage() == []

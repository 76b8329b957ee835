"""EngineFrontend: one engine served to several threads (what the ZeroMQ and HTTP servers share)."""

import threading

import pytest

from rapid import LLM, SamplingParams
from rapid.entrypoints.frontend import EngineFrontend, OverloadedError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


class Collector:
    def __init__(self):
        self.deltas = []
        self.done = threading.Event()

    def __call__(self, delta):
        self.deltas.append(delta)
        if delta.finished or delta.error is not None:
            self.done.set()

    @property
    def tokens(self):
        return [t for d in self.deltas for t in d.new_token_ids]


def test_requests_from_many_threads_equal_generate(tiny_llama):
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    with LLM(tiny_llama) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                                  use_tqdm=False)]
        frontend = EngineFrontend(llm)
        try:
            collectors = [Collector() for _ in prompts]
            threads = [threading.Thread(target=frontend.submit, args=(f"t{i}", p, GREEDY, c))
                       for i, (p, c) in enumerate(zip(prompts, collectors))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(c.done.wait(30) for c in collectors)
            assert [c.tokens for c in collectors] == expected
            assert all(c.deltas[-1].finish_reason == "length" for c in collectors) and frontend.num_pending == 0
            stats = frontend.get_stats()  # asked of the engine loop, from this thread
            assert stats.num_free_blocks == stats.num_blocks > 0 and stats.num_requests == 0
        finally:
            frontend.close()


def test_abort_overload_refusal_and_close(tiny_llama):
    with LLM(tiny_llama, max_model_len=256) as llm:
        frontend = EngineFrontend(llm, max_pending=2)
        observed = _Observed()  # the server's metrics: every request that reached the engine, to its end
        frontend.observe_requests(observed)
        try:
            long = SamplingParams(max_tokens=200, ignore_eos=True)
            a, b = Collector(), Collector()
            frontend.submit("a", [5, 6, 7], long, a)
            frontend.submit("b", [5, 6, 7], long, b)
            with pytest.raises(OverloadedError, match="limit is 2"):
                frontend.submit("c", [5, 6, 7], long, Collector())
            frontend.abort(["a"])
            assert a.done.wait(30) and a.deltas[-1].finish_reason == "abort"
            bad = Collector()
            frontend.submit("too-long", [5] * 200, long, bad)  # 400 tokens > max_model_len: refused by the engine
            assert bad.done.wait(30) and "max_model_len" in bad.deltas[-1].error
        finally:
            frontend.close()
        assert b.done.is_set() and b.deltas[-1].finished  # in flight at close: ended, with a final delta
        assert frontend.num_pending == 0
        # a (aborted), b (in flight at close), too-long (refused by the engine); c never reached it
        assert len(observed.made) == 3
        assert all(sum(d.finished or d.error is not None for d in seen) == 1 for seen in observed.made)
        assert all(seen[-1].finished or seen[-1].error is not None for seen in observed.made)
        assert [p.max_tokens for p in observed.params] == [200, 200, 200]  # each factory got the request's params
        assert observed.made[1][-1].first_scheduled_time > 0  # b ran: the engine said when it first scheduled it


class _BlockingEngine:
    """An engine whose get_deltas waits for `release` (the engine loop is busy in a step)."""

    def __init__(self):
        self.release, self.stepping = threading.Event(), threading.Event()
        self.added, self.aborted = [], []

    def add_request(self, msg):
        self.added.append(msg.request_id)

    def get_deltas(self, timeout_s=None):
        from rapid.protocol.engine import RequestDelta

        self.stepping.set()
        self.release.wait(10)
        out = [RequestDelta(rid, [], "", finished=True, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        return out

    def abort(self, ids):
        self.aborted += ids

    def check_health(self):
        pass


class _FakeLLM:
    def __init__(self, engine):
        self.engine = engine


def test_a_request_submitted_as_the_frontend_closes_still_gets_its_final_delta():
    from rapid.engine.client import EngineDeadError

    engine = _BlockingEngine()
    frontend = EngineFrontend(_FakeLLM(engine))
    first, second = Collector(), Collector()
    frontend.submit("first", [1, 2], GREEDY, first)
    assert engine.stepping.wait(10)  # the loop is inside a step
    frontend.submit("second", [1, 2], GREEDY, second)  # queued, not yet applied
    closer = threading.Thread(target=frontend.close)
    closer.start()
    while not frontend._stop.is_set():
        pass
    engine.release.set()
    closer.join(10)
    assert first.done.is_set() and second.done.is_set(), "a queued request was lost at close"
    assert frontend.num_pending == 0
    with pytest.raises(EngineDeadError, match="closed"):
        frontend.submit("late", [1, 2], GREEDY, Collector())
    assert frontend.num_pending == 0


def test_a_duplicate_request_id_is_refused_without_taking_over_the_first_request():
    engine = _BlockingEngine()
    engine.release.set()
    frontend = EngineFrontend(_FakeLLM(engine))
    try:
        first, dup = Collector(), Collector()
        frontend.submit("x", [1, 2], GREEDY, first)
        frontend.submit("x", [1, 2], GREEDY, dup)
        assert dup.done.wait(10) and "already in use" in dup.deltas[-1].error
        assert not first.done.is_set() and engine.added == ["x"] and frontend.num_pending == 1
        frontend.abort(["x"])
        assert first.done.wait(10) and first.deltas[-1].finish_reason == "abort"
        assert frontend.num_pending == 0
    finally:
        frontend.close()


def test_an_unexpected_engine_error_aborts_the_requests_in_the_engine(tiny_llama, monkeypatch):
    with LLM(tiny_llama, max_model_len=256) as llm:
        engine = llm.engine
        real_get_deltas, aborted = engine.get_deltas, []
        calls = {"n": 0}

        def flaky_get_deltas(timeout_s=None):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("a bug in the loop")
            return real_get_deltas(timeout_s)

        monkeypatch.setattr(engine, "get_deltas", flaky_get_deltas)
        real_abort = engine.abort
        monkeypatch.setattr(engine, "abort", lambda ids: (aborted.extend(ids), real_abort(ids)))
        frontend = EngineFrontend(llm)
        try:
            c = Collector()
            frontend.submit("victim", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), c)
            assert c.done.wait(30) and "a bug in the loop" in c.deltas[-1].error
            assert "victim" in aborted  # the engine stops working for it, not only its caller
        finally:
            frontend.close()


class _Observed:
    """What observe_requests' observers saw: per request made, its deltas."""

    def __init__(self):
        self.made: list[list] = []
        self.params: list = []  # the SamplingParams each request runs with

    def __call__(self, num_prompt_tokens, params):
        seen = []
        self.made.append(seen)
        self.params.append(params)

        class Observer:
            def on_delta(self, delta):
                seen.append(delta)

        return Observer()


def test_observers_see_each_request_that_reaches_the_engine_to_its_end():
    """The server's metrics (observe_requests): an observer per request the engine takes, fed to its final delta; a
    refused duplicate id gets none and leaves the first one's alone; a broken factory only loses its own; stop()
    ends the following."""
    engine = _BlockingEngine()
    engine.release.set()
    frontend = EngineFrontend(_FakeLLM(engine))
    observed = _Observed()

    def broken(num_prompt_tokens, params):
        raise RuntimeError("a broken factory")

    try:
        stop = frontend.observe_requests(observed)
        assert frontend.observe_requests(observed) is not None  # given twice, counted once
        frontend.observe_requests(broken)
        first, dup = Collector(), Collector()
        frontend.submit("x", [1, 2], GREEDY, first)
        frontend.submit("x", [1, 2], GREEDY, dup)
        assert dup.done.wait(10) and "already in use" in dup.deltas[-1].error
        frontend.abort(["x"])
        assert first.done.wait(10) and first.deltas[-1].finish_reason == "abort"
        assert [[d.finish_reason for d in seen] for seen in observed.made] == [["abort"]]
        stop()
        later = Collector()
        frontend.submit("y", [1, 2], GREEDY, later)
        frontend.abort(["y"])
        assert later.done.wait(10) and len(observed.made) == 1  # no longer followed
    finally:
        frontend.close()


def test_a_delta_that_only_says_the_request_was_scheduled_goes_to_the_observers_only():
    """The engine core says when it first schedules a request (RequestDelta.is_empty, first_scheduled_time set): the
    server's metrics turn it from waiting to running then; the request's consumer (a stream) gets nothing for it."""
    from rapid.protocol.engine import RequestDelta

    class Scripted(_BlockingEngine):
        def get_deltas(self, timeout_s=None):
            out = [d for rid in self.added for d in (
                RequestDelta(rid, [], "", first_scheduled_time=1.0),
                RequestDelta(rid, [3], "c", finished=True, finish_reason="length", first_scheduled_time=1.0))]
            self.added = []
            return out

    frontend = EngineFrontend(_FakeLLM(Scripted()))
    observed, consumer = _Observed(), Collector()
    try:
        frontend.observe_requests(observed)
        frontend.submit("x", [1, 2], GREEDY, consumer)
        assert consumer.done.wait(10)
        assert [d.is_empty for d in observed.made[0]] == [True, False] and observed.params == [GREEDY]
        assert [d.new_token_ids for d in consumer.deltas] == [[3]]
    finally:
        frontend.close()

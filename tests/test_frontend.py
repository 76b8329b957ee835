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

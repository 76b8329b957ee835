"""Mode 'hybrid' with engine_process: the engine core and the model in one child process (what `rapid serve` runs),
the same tokens as in the user's process, and nothing left behind however the child ends."""

import os
import signal
import threading

import pytest

from rapid import LLM, SamplingParams
from rapid.engine.client import EngineDeadError
from rapid.engine.mp_client import MPClient
from tiny import children, engine_pids, gone, hf_greedy

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[(11 * i + 7 * n) % 290 + 5 for i in range(n)] for n in (1, 9, 40, 77)]


def test_greedy_equals_in_process_and_transformers_and_the_child_goes_at_shutdown(tiny_llama):
    others = {p.pid for p in children()}
    with LLM(tiny_llama, mode="hybrid", engine_process=True, max_num_batched_tokens=32) as llm:
        assert isinstance(llm.engine, MPClient)
        pids = engine_pids(llm)
        assert list(pids) == ["core"] and {p.pid for p in children(others)} == {pids["core"], llm.engine.reaper.pid}
        assert set(llm.engine.started["core"].allowed_bytes) == {"core"}  # the memory check finds its plan
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                            use_tqdm=False)]
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == stats.num_blocks and llm.config.scheduler.max_num_seqs > 0
    with LLM(tiny_llama, mode="hybrid", max_num_batched_tokens=32) as llm:
        assert not isinstance(llm.engine, MPClient)
        inproc = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                               use_tqdm=False)]
    assert got == inproc == [hf_greedy(tiny_llama, p, 10) for p in PROMPTS]
    assert gone(pids["core"]) and not children(others)


def test_a_killed_engine_process_ends_requests_with_an_error_then_restarts(tiny_llama):
    others = {p.pid for p in children()}
    llm = LLM(tiny_llama, mode="hybrid", engine_process=True, max_num_batched_tokens=16)
    pid = engine_pids(llm)["core"]
    timer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    timer.start()
    with pytest.raises(EngineDeadError, match=rf"core process \(pid {pid}\) died with exit code -9"):
        llm.generate([{"prompt_token_ids": list(range(5 + i, 105 + i))} for i in range(16)],
                     SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
    timer.join()
    assert gone(pid)
    out = llm.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and engine_pids(llm)["core"] != pid
    llm.shutdown()
    assert not children(others)


def test_the_core_process_never_sleeps_while_its_executor_has_work():
    """With async scheduling a step can launch and read nothing back (the pipeline's first step): the core process
    must poll again at once, not wait on its inbox (measured before the fix, through `rapid serve` on the tiny
    model: a 50-60 ms gap after every first token)."""
    from types import SimpleNamespace

    from rapid.engine.core_process import IDLE_POLL_MS, poll_timeout_ms
    from rapid.engine.inproc import HybridExecutor, InprocWorkers

    class Loop:
        work = False

        def has_work(self):
            return self.work

    executor = HybridExecutor.__new__(HybridExecutor)  # its model set-up is not under test
    executor.workers = InprocWorkers(Loop())
    idle, progressed = SimpleNamespace(progressed=False), SimpleNamespace(progressed=True)
    assert poll_timeout_ms(idle, executor) == poll_timeout_ms(idle, None) == IDLE_POLL_MS > 0
    assert poll_timeout_ms(progressed, executor) == poll_timeout_ms(progressed, None) == 0
    executor.workers.loop.work = True  # a step in flight
    assert poll_timeout_ms(idle, executor) == 0
    executor.workers.loop.work = False
    executor.workers.pending.append(object())  # an answer (Dropped) not yet delivered
    assert poll_timeout_ms(idle, executor) == 0

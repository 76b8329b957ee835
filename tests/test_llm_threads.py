"""LLM.generate and generate_stream used by several callers at once (rapid/entrypoints/delta_router.py): two
threads, two streams read in turn by one thread, a stream left open across a generate(). Each caller gets its
own requests' whole output, equal to what one caller alone gets (they used to drop each other's deltas: hangs, and
in hybrid outputs cut short with finish_reason 'length')."""

import gc
import threading

import pytest

from rapid import LLM, SamplingParams
from tiny import hf_greedy

PROMPTS = [[5, 9, 30, 41, 7], [88, 120, 17], [250, 33, 6, 6], [11, 12]]
OTHER = [[70, 71, 72], [3, 4, 5, 6, 7, 8], [99], [140, 141]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=["hybrid", "rapid"])
def llm(request, tiny_llama):
    with LLM(tiny_llama, mode=request.param, max_model_len=128) as llm:
        yield llm


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_two_threads_each_get_their_whole_outputs(llm, tiny_llama):
    got: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(name, prompts):
        try:
            got[name] = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        except BaseException as e:  # reported below: a thread's exception would only be printed
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name, prompts), daemon=True)
               for name, prompts in (("a", PROMPTS), ("b", OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for name, prompts in (("a", PROMPTS), ("b", OTHER)):
        assert [o.prompt_token_ids for o in got[name]] == prompts
        assert all(o.finished and o.outputs[0].finish_reason == "length" for o in got[name])
        assert tokens(got[name]) == [hf_greedy(tiny_llama, p, 24) for p in prompts]


def test_two_streams_read_in_turn_and_a_stream_left_open_across_a_generate(llm):
    want = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], GREEDY, use_tqdm=False))
    first, second = (llm.generate_stream({"prompt_token_ids": p}, GREEDY) for p in PROMPTS[:2])
    streamed: list[list[int]] = [[], []]
    for a, b in zip(first, second):  # one thread, two live streams
        streamed[0] += a.new_token_ids
        streamed[1] += b.new_token_ids
    for i, rest in enumerate((first, second)):  # whichever ended later
        streamed[i] += [t for d in rest for t in d.new_token_ids]
    assert streamed == want

    stream = llm.generate_stream({"prompt_token_ids": PROMPTS[0]}, GREEDY)
    head = next(stream).new_token_ids
    middle = llm.generate([{"prompt_token_ids": p} for p in OTHER], GREEDY, use_tqdm=False)  # the stream waits
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 24 for o in middle)
    assert head + [t for d in stream for t in d.new_token_ids] == want[0]


def test_a_stream_dropped_in_a_reference_cycle_is_aborted_inside_a_poll_without_a_deadlock(llm, monkeypatch):
    """The collector finalises an abandoned stream (its `finally` aborts the request) in the middle of the next
    generate's poll, in that same thread: the abort waits for the poll's end (it used to take the engine lock the
    poll held, and hang for ever)."""
    stream = llm.generate_stream({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    cycle = [stream]
    cycle.append(cycle)
    del stream, cycle
    poll = llm.engine.get_deltas

    def poll_with_a_collection(*args, **kwargs):  # where an allocation may start the collector
        gc.collect()
        return poll(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "get_deltas", poll_with_a_collection)
    done: list = []
    t = threading.Thread(target=lambda: done.append(llm.generate(
        [{"prompt_token_ids": p} for p in OTHER], GREEDY, use_tqdm=False)), daemon=True)
    t.start()
    t.join(120)
    assert done and all(len(o.outputs[0].token_ids) == 24 for o in done[0])
    assert llm.engine.get_stats().num_requests == 0  # the dropped stream's request was aborted


def test_ctrl_c_in_the_middle_of_a_hybrid_step_costs_no_other_request_a_token(tiny_llama, monkeypatch):
    """Ctrl-C landing inside an in-process step (its batch run by the executor, the results not yet applied) used
    to lose that step's output: a stream running beside the interrupted generate() missed a token. The interrupt
    now waits for the step's end: generate raises KeyboardInterrupt, the stream gets every token, and once the
    engine steps again nothing of the interrupted requests is left."""
    import signal

    with LLM(tiny_llama, mode="hybrid", max_model_len=128) as llm:
        stream = llm.generate_stream({"prompt_token_ids": OTHER[1]}, GREEDY)
        streamed = list(next(stream).new_token_ids)  # running: the generate's steps below carry it too
        loop = llm.engine.executor.workers.loop
        step, calls = loop.step, []

        def interrupted_step():  # Ctrl-C after the forward pass, before its results reach the scheduler
            results = step()
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)  # Python runs the handler here, at once
            return results

        monkeypatch.setattr(loop, "step", interrupted_step)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert len(calls) == 3
        streamed += [t for d in stream for t in d.new_token_ids]
        assert streamed == hf_greedy(tiny_llama, OTHER[1], 24)
        assert llm.engine.get_stats().num_requests == 0

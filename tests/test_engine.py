"""The hybrid engine end to end on the CPU: greedy equals transformers, chunking, preemption, prefix cache,
sampling, stop strings, logprobs, and every edge validation error."""

import json
import random
import re

import pytest
import torch

from rapid import LLM, SamplingParams
from rapid.engine.client import EngineDeadError
from tiny import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def varied_prompts(n=6, seed=0, vocab=300):
    rng = random.Random(seed)
    lengths = [1, 5, 17, 33, 64, 90][:n]
    return [[rng.randrange(5, vocab) for _ in range(length)] for length in lengths]


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    prompts = varied_prompts()
    return prompts, [hf_greedy(tiny_llama, p, GREEDY.max_tokens) for p in prompts]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def generate(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_greedy_equals_transformers_ample_kv(tiny_llama, oracle):
    prompts, expected = oracle
    with LLM(tiny_llama) as llm:
        outs = generate(llm, prompts)
    assert tokens(outs) == expected
    assert all(o.outputs[0].finish_reason == "length" and o.finished for o in outs)


def test_greedy_equals_transformers_with_chunked_prefill(tiny_llama, oracle):
    prompts, expected = oracle
    with LLM(tiny_llama, max_num_batched_tokens=16) as llm:  # every long prompt is split into chunks
        assert tokens(generate(llm, prompts)) == expected


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_greedy_equals_transformers_under_preemption(tiny_llama, oracle, async_scheduling):
    prompts, expected = oracle
    # 16 blocks of 16 tokens (2 layers * 2 * 16 * 2 heads * 16 dims * 4 bytes = 8 KiB each): the six
    # requests need 25 blocks at once, so some are preempted and recomputed. Both decode-loop schedules.
    with LLM(tiny_llama, kv_cache_memory_bytes=16 * 8192, enable_prefix_caching=False,
             async_scheduling=async_scheduling) as llm:
        assert llm.engine.num_blocks == 16
        outs = generate(llm, prompts)
        assert tokens(outs) == expected
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == 16 and stats.num_requests == 0


def test_preemption_really_happens(tiny_llama):
    with LLM(tiny_llama, kv_cache_memory_bytes=10 * 8192, enable_prefix_caching=False) as llm:
        prompts = varied_prompts(seed=5)[2:]
        generate(llm, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        assert llm.engine.get_stats().num_preemptions > 0, "the KV budget was meant to force preemption"


def test_prefix_cache_hits_reported_and_output_unchanged(tiny_llama):
    rng = random.Random(7)
    shared = [rng.randrange(5, 300) for _ in range(40)]
    a, b = shared + [11, 12], shared + [13, 14, 15]
    with LLM(tiny_llama) as llm:
        first = generate(llm, [a])[0]
        second = generate(llm, [b])[0]
    with LLM(tiny_llama, enable_prefix_caching=False) as llm:
        plain = generate(llm, [b])[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32  # two full blocks of the shared 40 tokens
    assert plain.num_cached_tokens == 0
    assert second.outputs[0].token_ids == plain.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(tiny_llama):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 1, 2)]
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    with LLM(tiny_llama) as llm:
        outs = llm.generate([prompt] * 3, params, use_tqdm=False)
        again = llm.generate([prompt], params[0], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == again[0].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids


def test_n_samples_per_prompt(tiny_llama):
    with LLM(tiny_llama) as llm:
        out = llm.generate("The quick brown", SamplingParams(n=3, seed=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1


def test_stop_strings_are_trimmed(tiny_llama):
    with LLM(tiny_llama) as llm:
        full = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
        text = full.outputs[0].text
        assert len(text) > 6
        stop = text[3:6]
        cut = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        kept = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                       include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
        # as vLLM: stop strings count only in text decoded after min_tokens tokens
        late = llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                       min_tokens=len(cut.token_ids) + 2), use_tqdm=False)[0].outputs[0]
    first = text.index(stop)
    assert cut.text == text[:first] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert kept.text == text[: first + len(stop)]
    assert len(cut.token_ids) < 20
    assert len(late.token_ids) >= len(cut.token_ids) + 2 and text.startswith(late.text) and len(late.text) > first


def test_stop_token_ids_and_eos(tiny_llama):
    with LLM(tiny_llama) as llm:
        ids = generate(llm, [[5, 6, 7]])[0].outputs[0].token_ids
        stop_at = ids[4]
        out = generate(llm, [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == ids[: ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_eos_text_is_left_out_unless_asked_for(tiny_llama):
    # as vLLM: with skip_special_tokens=False the EOS that ends a request still adds no text, unless
    # include_stop_str_in_output; its id stays in token_ids either way
    eos = json.loads((tiny_llama / "config.json").read_text())["eos_token_id"]
    params = dict(temperature=0, max_tokens=5, skip_special_tokens=False, logit_bias={eos: 100})
    with LLM(tiny_llama) as llm:
        hidden = llm.generate("hi", SamplingParams(**params), use_tqdm=False)[0].outputs[0]
        shown = llm.generate("hi", SamplingParams(**params, include_stop_str_in_output=True), use_tqdm=False)[0]
    assert hidden.token_ids == [eos] and hidden.text == "" and hidden.finish_reason == "stop"
    assert shown.outputs[0].token_ids == [eos] and shown.outputs[0].text != ""


def test_logprobs_equal_transformers_log_softmax(tiny_llama):
    from transformers import AutoModelForCausalLM

    prompt = [5, 9, 30, 41, 7]
    with LLM(tiny_llama) as llm:
        out = generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    logits = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    total = 0.0
    for t, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + t]
        assert tok in lp and len(lp) >= 3
        for tid, entry in lp.items():  # vLLM's Logprob: logprob, 1-based rank, decoded text
            assert entry.logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert entry.rank == int((row > row[tid] + 1e-4).sum()) + 1
            assert entry.decoded_token == llm.tokenizer.decode([tid])
        top3 = row.topk(3).indices.tolist()
        assert set(top3) <= set(lp)
        total += row[tok].item()
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_outputs_metrics_and_order(tiny_llama):
    with LLM(tiny_llama) as llm:
        outs = llm.generate(["hello", "The quick brown fox", "héllo 世界"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", "The quick brown fox", "héllo 世界"]
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.last_token_time
        assert o.request_id and o.prompt_token_ids


def test_chat_applies_template(tiny_llama):
    with LLM(tiny_llama) as llm:
        out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3), use_tqdm=False)[0]
        assert out.prompt.startswith("<|user|>hi") and out.prompt.endswith("<|assistant|>")
        two = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                       SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(two) == 2
        # OpenAI content parts: the text parts joined by newlines (as vLLM), never the list's Python repr
        parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
        out = llm.chat([{"role": "user", "content": parts}], SamplingParams(max_tokens=2), False)[0]
        assert out.prompt.startswith("<|user|>hi\nthere") and "type" not in out.prompt
        with pytest.raises(ValueError, match="only text parts are supported, got type 'image_url'"):
            llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], use_tqdm=False)


def test_generate_stream_yields_deltas(tiny_llama):
    with LLM(tiny_llama) as llm:
        deltas = list(llm.generate_stream("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
        whole = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
        left_open = llm.generate_stream("hello", SamplingParams(max_tokens=100, ignore_eos=True))
        next(left_open)
    assert deltas[-1].finished and sum(len(d.new_token_ids) for d in deltas) == 8
    assert "".join(d.new_text for d in deltas) == whole.outputs[0].text
    left_open.close()  # after the engine's shutdown (at interpreter exit, say): it used to raise AttributeError


@pytest.mark.parametrize("prompt,error,match", [
    ("", ValueError, "empty"),
    ({"prompt_token_ids": []}, ValueError, "empty"),
    ({"prompt_token_ids": [1, 99999]}, ValueError, "99999.*vocabulary"),
    ({"prompt_token_ids": [-1]}, ValueError, "vocabulary"),
    ({"prompt_token_ids": list(range(5, 300)) * 2}, ValueError, "max_model_len"),
    ({"prompt_token_ids": "abc"}, TypeError, "list of ints"),
    ({"tokens": [1]}, TypeError, "prompt_token_ids"),
    (42, TypeError, "str"),
    (b"bytes", TypeError, "str"),
    ("ab\ud800cd", ValueError, "prompt is not valid Unicode text: surrogates not allowed at character 2"),
])
def test_bad_prompts_rejected_at_the_edge_and_engine_keeps_serving(tiny_llama, prompt, error, match):
    with LLM(tiny_llama, max_model_len=512) as llm:
        with pytest.raises(error, match=match):
            llm.generate([prompt] if not isinstance(prompt, bytes) else prompt, use_tqdm=False)
        assert not llm.engine.get_stats().num_requests
        assert len(generate(llm, [[5, 6, 7]])[0].outputs[0].token_ids) == 12


def test_a_lone_surrogate_or_a_refusing_template_is_a_value_error_and_close_is_shutdown(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=512)
    with pytest.raises(ValueError, match="message 1's content is not valid Unicode text"):
        llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "\udfff"}], use_tqdm=False)
    with pytest.raises(ValueError, match="the chat template refused the conversation: roles must alternate"):
        llm.chat([{"role": "user", "content": "hi"}], chat_template="{{ raise_exception('roles must alternate') }}",
                 use_tqdm=False)
    assert len(generate(llm, [[5, 6, 7]])[0].outputs[0].token_ids) == 12
    llm.close()
    with pytest.raises(EngineDeadError, match="shut down"):
        generate(llm, [[5, 6, 7]])
    with pytest.raises(EngineDeadError, match="shut down"):  # as in rapid (it was an AttributeError)
        llm.engine.get_stats()
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.engine.set_token_budget(16)


def test_request_that_cannot_fit_is_rejected_before_scheduling(tiny_llama):
    with LLM(tiny_llama, max_model_len=64) as llm:
        with pytest.raises(ValueError, match="prompt has 64 tokens; max_model_len is 64"):
            generate(llm, [[5] * 10, [6] * 64], SamplingParams(max_tokens=10))
        assert not llm.engine.get_stats().num_requests  # the first, valid prompt was withdrawn too
        # as vLLM's offline API: a max_tokens past max_model_len ends the output there, with finish_reason length
        out = generate(llm, [[6] * 60], SamplingParams(max_tokens=10, min_tokens=8, ignore_eos=True))[0].outputs[0]
        assert len(out.token_ids) == 4 and out.finish_reason == "length"
        out = generate(llm, [[6] * 60], SamplingParams(max_tokens=None, min_tokens=8))[0].outputs[0]
        assert len(out.token_ids) == 4 and out.finish_reason == "length"  # the same without max_tokens
    with LLM(tiny_llama, kv_cache_memory_bytes=2 * 8192) as llm:  # 32 tokens of KV: less than max_model_len
        out = generate(llm, [[5] * 20], SamplingParams(max_tokens=20, ignore_eos=True))[0].outputs[0]
        assert len(out.token_ids) == 12 and out.finish_reason == "length"  # cut to the pool, as to max_model_len
        with pytest.raises(ValueError, match=re.escape("prompt has 40 tokens; the KV pool holds 32 tokens, fewer "
                                                       "than max_model_len (512)")):  # no max_tokens would help
            generate(llm, [[5] * 40], SamplingParams(max_tokens=1))


def test_unknown_keyword_and_bad_config_are_errors(tiny_llama):
    with pytest.raises(TypeError, match="unexpected keyword"):
        LLM(tiny_llama, max_num_seq=4)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(tiny_llama, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="mode"):
        LLM(tiny_llama, mode="fast")
    with pytest.raises(ValueError, match=re.escape("prefill_attention must be one of ('flash', 'cudnn', 'auto', "
                                                   "'paged'), got 'fa3'")):
        LLM(tiny_llama, prefill_attention="fa3")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, max_model_len=10**6)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        LLM("/nonexistent/model")


def test_sampling_params_list_length_must_match(tiny_llama):
    with LLM(tiny_llama) as llm:
        with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
            llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_qwen3_greedy_equals_transformers(tiny_qwen3):
    prompts = varied_prompts(4, seed=2)
    with LLM(tiny_qwen3, max_num_batched_tokens=24) as llm:
        got = tokens(generate(llm, prompts))
    assert got == [hf_greedy(tiny_qwen3, p, GREEDY.max_tokens) for p in prompts]


def test_cli_generate_warms_the_engine_before_timing(tiny_llama, capsys, monkeypatch):
    from rapid.entrypoints import cli
    from rapid.entrypoints.llm import LLM as _LLM

    calls = []
    real = _LLM.generate

    def recording(self, prompts, params=None, **kw):
        calls.append((prompts, params.max_tokens))
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(_LLM, "generate", recording)
    assert cli.main(["generate", "Paris is", "--model", str(tiny_llama), "--max-tokens", "6"]) == 0
    assert [c[1] for c in calls] == [2, 6]  # the warm-up, then the timed run
    out = capsys.readouterr().out
    assert "tokens/s" in out and "6 tokens in" in out


def test_a_closed_hybrid_engine_frees_its_model(tiny_llama):
    """Shutting the in-process engine down drops every reference to its model and KV pool, so the next engine of a
    sweep (rapid bench serve runs hybrid, then rapid, in one process) finds the GPU memory free. The engine leaves
    the user's process's garbage collector as it found it (rapid.worker.gc_heap freezes only processes rapid owns);
    inside startup_heap_frozen (rapid's own commands) the heap is frozen, and thawed at the block's end."""
    import gc
    import weakref

    from rapid.worker.gc_heap import FULL_COLLECTION_THRESHOLD, startup_heap_frozen

    frozen_before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    llm = LLM(tiny_llama)
    assert gc.get_freeze_count() == frozen_before  # the user's process: nothing frozen behind their back
    assert gc.get_threshold() == thresholds  # nor its collector retuned
    with startup_heap_frozen("test"):
        assert gc.get_freeze_count() > frozen_before  # the start-up heap (torch, the model, the engine) frozen
        young, middle, oldest = gc.get_threshold()  # full collections rarer, the younger generations as they were
        assert (young, middle) == thresholds[:2] and oldest == max(thresholds[2], FULL_COLLECTION_THRESHOLD)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
    runner = llm.engine.executor.workers.loop.runner
    model, pool = weakref.ref(runner.model), weakref.ref(runner.kv_pool)
    del runner
    llm.shutdown()
    gc.collect()
    assert model() is None and pool() is None


def test_device_time_by_step_kind(tiny_llama):
    # hybrid: prompts in the decode worker's steps ("inline" alone, "mixed" beside decode rows), then decode steps
    with LLM(tiny_llama, max_num_batched_tokens=32) as llm:
        llm.generate([{"prompt_token_ids": [7] * 20}], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
        generate(llm, varied_prompts())
        totals = llm.engine.get_stats().device_time
    assert {"decode", "mixed", "inline"} <= set(totals) and "prefill" not in totals
    for steps, busy, idle in totals.values():
        assert steps >= 1 and busy > 0 and idle >= 0
    assert totals["decode"][0] >= GREEDY.max_tokens


def test_steps_outside_the_graphs_are_counted(tiny_llama):
    """A process that captured graphs runs a batch none of them fits eagerly: the stats count those steps by kind
    (a silent fallback would cost speed unseen). A stand-in graph runner takes decode-only batches here."""
    with LLM(tiny_llama) as llm:
        prompt, params = [{"prompt_token_ids": [5] * 20}], SamplingParams(max_tokens=4, ignore_eos=True)
        llm.generate(prompt, params, use_tqdm=False)
        assert llm.engine.get_stats().eager_steps == {}  # no graphs captured (the CPU): nothing fell back
        runner = llm.engine.core.workers.loop.runner

        class DecodeOnly:
            def can_run(self, meta, num_tokens):
                return meta.num_prefills == 0

            def run(self, ids, positions, meta):
                return runner.model(ids, positions, runner.kv_pool, meta)

        runner.graph_runners = [DecodeOnly()]
        llm.generate(prompt, params, use_tqdm=False)
        stats = llm.engine.get_stats()
        del runner
    assert stats.eager_steps == {"inline": 1}  # the prompt's step; its decode steps fit the stand-in graph
    assert stats.device_time["decode"][0] >= 6


def test_metrics_count_steps_outside_the_graphs():
    """/metrics: rapid:eager_steps{kind}, one sample per kind that fell back (none before)."""
    from prometheus_client.parser import text_string_to_metric_families

    from rapid.entrypoints.openai.metrics import ServerMetrics
    from rapid.protocol.engine import Stats

    def samples(eager):
        text = ServerMetrics("m", "hybrid", get_stats=lambda: Stats([], [], [], [], eager_steps=eager),
                             stats_interval_s=0).render().decode()
        return {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "rapid:eager_steps_total"}

    assert samples({}) == {}
    assert samples({"mixed": 3, "prefill": 1}) == {"mixed": 3.0, "prefill": 1.0}


def test_device_timer_reads_busy_and_idle_from_its_events():
    from rapid.worker.device_timer import DeviceTimer

    clock = iter([1.0, 1.5, 2.0, 2.25])  # start, end of step 1; start, end of step 2 (seconds)

    class Event:
        def record(self):
            self.t = next(clock)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    timer = DeviceTimer(torch.device("cpu"), event_factory=Event)
    first = timer.begin()
    timer.finish(first)
    second = timer.begin()
    timer.finish(second)
    assert DeviceTimer.read(first) == (0.5, 0.0)  # no step before it: no idle time counted
    assert DeviceTimer.read(second) == (0.25, 0.5)  # the device waited from 1.5 to 2.0



def test_a_kv_pool_shorter_than_max_model_len_is_reported(tiny_llama, caplog):
    # the longest sequence is the pool's; a max_model_len the user set that the pool cannot hold is a warning
    with caplog.at_level("INFO", logger="rapid.entrypoints.llm"):
        with LLM(tiny_llama, max_model_len=256, kv_cache_memory_bytes=6 * 8192) as llm:
            longest = llm.longest_sequence
    assert longest < 256 and longest == llm.engine.num_blocks * llm.config.cache.block_size
    warned = [r for r in caplog.records if "fewer than max_model_len (256)" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


def test_a_step_that_sampled_nothing_is_not_waited_for_its_time():
    from types import SimpleNamespace

    from rapid.worker.device_timer import DeviceTimer, Span
    from rapid.worker.model_runner import Launched, ModelRunner

    class Running:  # an event the device has not reached yet
        def query(self):
            return False

        def synchronize(self):
            raise AssertionError("timing made the host wait")

    runner = SimpleNamespace(timer=DeviceTimer)
    assert ModelRunner.device_time(runner, Launched([], None, False, Span(None, Running(), Running()))) is None


def test_cli_generate_chat_without_a_template_names_no_chat(tiny_llama, tmp_path, capsys):
    import json
    import shutil

    from rapid.entrypoints import cli

    folder = tmp_path / "plain"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert cli.main(["generate", "Paris is", "--model", str(folder), "--chat", "--max-tokens", "2"]) == 2
    assert "has no chat template; use --no-chat" in capsys.readouterr().err
    assert cli.main(["generate", "Paris is", "--model", str(folder), "--max-tokens", "2"]) == 0  # plain by default

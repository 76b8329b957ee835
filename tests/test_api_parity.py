"""vLLM's offline API through LLM, in modes 'hybrid' and 'rapid', against transformers: TextPrompt /
TokensPrompt dicts, sampling params as a dict, Logprob objects (logprob, rank, decoded_token),
prompt_logprobs, logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens, max_tokens=None,
stop_token_ids' text, and chat's template options."""

import pytest
import torch

from rapid import LLM, Logprob, SamplingParams, TextPrompt, TokensPrompt
from rapid.entrypoints.llm_outputs import LogprobConverter
from tiny import hf_greedy

MAX_MODEL_LEN = 96
PROMPT = [5, 9, 30, 41, 7, 88, 120, 17, 250, 33] * 4  # 40 tokens: chunked by max_num_batched_tokens=16


@pytest.fixture(scope="module", params=["hybrid", "rapid"])
def llm(request, tiny_llama):
    with LLM(tiny_llama, mode=request.param, max_num_batched_tokens=16, max_model_len=MAX_MODEL_LEN) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def hf_log_softmax(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def hf_greedy_processed(hf, prompt, n, process):
    """Greedy with `process(logits [V], output so far) -> logits` applied before the argmax."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        out.append(int(process(logits.clone(), out).argmax()))
    return out


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def test_text_and_tokens_prompt_dicts(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = llm.tokenizer.encode("Paris is")
    outs = gen(llm, ["Paris is", TextPrompt(prompt="Paris is"), TokensPrompt(prompt_token_ids=ids),
                     {"prompt_token_ids": ids, "prompt": "echoed"}], params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt for o in outs] == ["Paris is", "Paris is", None, "echoed"]
    assert all(o.prompt_token_ids == ids for o in outs)
    with pytest.raises(TypeError, match="prompt"):
        gen(llm, [{"text": "Paris"}], params)


def test_sampling_params_as_dict(llm, tiny_llama):
    d = {"temperature": 0, "max_tokens": 5, "ignore_eos": True}
    got = gen(llm, [{"prompt_token_ids": PROMPT}], d)[0].outputs[0].token_ids
    assert got == hf_greedy(tiny_llama, PROMPT, 5)
    assert gen(llm, [{"prompt_token_ids": PROMPT}], [d])[0].outputs[0].token_ids == got
    with pytest.raises(TypeError, match="max_token"):
        gen(llm, "hi", {"max_token": 5})
    with pytest.raises(ValueError, match="temperature"):
        gen(llm, "hi", {"temperature": -1})


def test_logprobs_and_prompt_logprobs_equal_transformers(llm, hf):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    for attempt in range(2):  # the second run would hit the prefix cache: prompt_logprobs bypass it
        out = gen(llm, [{"prompt_token_ids": PROMPT}], params)[0]
        assert out.num_cached_tokens == 0
        ref = hf_log_softmax(hf, PROMPT + out.outputs[0].token_ids)
        assert len(out.prompt_logprobs) == len(PROMPT) and out.prompt_logprobs[0] is None
        for j in range(1, len(PROMPT)):
            entries, row = out.prompt_logprobs[j], ref[j - 1]
            assert PROMPT[j] in entries and set(row.topk(3).indices.tolist()) <= set(entries)
            for tid, e in entries.items():
                assert isinstance(e, Logprob) and e.logprob == pytest.approx(row[tid].item(), abs=1e-4)
                assert e.rank == int((row > row[tid] + 1e-4).sum()) + 1
                assert e.decoded_token == llm.tokenizer.decode([tid])
        for t, (tok, entries) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            row = ref[len(PROMPT) - 1 + t]
            assert entries[tok].rank == 1 and entries[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)


def test_logprobs_dicts_start_with_the_chosen_token_as_vllm(llm):
    # vLLM puts the sampled (or prompt) token first, then the top-N; RAPID put it after them when outside the top-N
    params = SamplingParams(temperature=2.0, seed=11, max_tokens=24, ignore_eos=True, logprobs=1)
    comp = gen(llm, [{"prompt_token_ids": PROMPT}], params)[0].outputs[0]
    assert any(entries[tok].rank > 1 for tok, entries in zip(comp.token_ids, comp.logprobs))  # a token outside top-1
    assert [next(iter(entries)) for entries in comp.logprobs] == comp.token_ids
    assert all(len(entries) <= 2 for entries in comp.logprobs)
    # prompt logprobs go through the same conversion: the prompt token (here outside the top-2) first
    (entries,) = LogprobConverter(None).convert([{4: -1.0, 8: -2.0, 3: -5.0}], [3], [9])
    assert list(entries) == [3, 4, 8] and [e.rank for e in entries.values()] == [9, 1, 2]


def test_logit_bias_allowed_token_ids_and_bad_words_equal_transformers(llm, hf):
    base = dict(temperature=0, max_tokens=8, ignore_eos=True)
    plain = gen(llm, [{"prompt_token_ids": PROMPT}], SamplingParams(**base))[0].outputs[0].token_ids

    bias = {plain[0]: -30.0, 77: 4.0}

    def with_bias(x, _):
        for t, b in bias.items():
            x[t] += b
        return x

    out = gen(llm, [{"prompt_token_ids": PROMPT}], SamplingParams(**base, logit_bias=bias))[0].outputs[0]
    assert out.token_ids == hf_greedy_processed(hf, PROMPT, 8, with_bias)

    allowed = [11, 12, 13, 77, 200]

    def only_allowed(x, _):
        keep = torch.full_like(x, float("-inf"))
        keep[allowed] = x[allowed]
        return keep

    out = gen(llm, [{"prompt_token_ids": PROMPT}], SamplingParams(**base, allowed_token_ids=allowed))[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and out.token_ids == hf_greedy_processed(hf, PROMPT, 8, only_allowed)

    # a bad word that is one token of the plain output (and encodes back to itself)
    tok = llm.tokenizer
    word_tok = next(t for t in plain if tok.encode(tok.decode([t]).lstrip(), add_special_tokens=False) == [t])
    word = tok.decode([word_tok])
    banned = {ids[0] for ids in (tok.encode(p + word.lstrip(), add_special_tokens=False) for p in ("", " "))
              if len(ids) == 1}

    def no_bad(x, _):
        x[list(banned)] = float("-inf")
        return x

    out = gen(llm, [{"prompt_token_ids": PROMPT}], SamplingParams(**base, bad_words=[word]))[0].outputs[0]
    assert word_tok not in out.token_ids and out.token_ids == hf_greedy_processed(hf, PROMPT, 8, no_bad)


def test_truncate_prompt_tokens_and_max_tokens_none(llm, tiny_llama):
    long = list(range(5, 5 + 90))
    out = gen(llm, [{"prompt_token_ids": long}], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                                 truncate_prompt_tokens=20))[0]
    assert out.prompt_token_ids == long[-20:]
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, long[-20:], 5)
    out = gen(llm, [{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == MAX_MODEL_LEN - len(PROMPT)
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, PROMPT, MAX_MODEL_LEN - len(PROMPT))


def test_stop_token_text_left_out_unless_asked(llm):
    base = dict(temperature=0, max_tokens=10, ignore_eos=True, skip_special_tokens=False)
    plain = gen(llm, "Paris is", SamplingParams(**base))[0].outputs[0].token_ids
    stop = plain[3]
    k = plain.index(stop)
    for include in (False, True):
        c = gen(llm, "Paris is", SamplingParams(**base, stop_token_ids=[stop], include_stop_str_in_output=include)
                )[0].outputs[0]
        assert c.token_ids == plain[: k + 1] and c.finish_reason == "stop" and c.stop_reason == stop
        kept = plain[: k + 1] if include else plain[:k]
        assert c.text == llm.tokenizer.decode(kept, skip_special_tokens=False)


TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if not loop.last or not continue_final %}</>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}{{ suffix | default('') }}")


def test_chat_template_options(llm):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel"}]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    cases = [
        (dict(chat_template=TEMPLATE), "<user>hi</><assistant>hel</><assistant>"),
        (dict(chat_template=TEMPLATE, add_generation_prompt=False, chat_template_kwargs={"suffix": "!"}),
         "<user>hi</><assistant>hel</>!"),
        (dict(chat_template=TEMPLATE.replace("not continue_final", "true"), add_generation_prompt=False,
              continue_final_message=True, tools=None), "<user>hi</><assistant>hel"),
    ]
    for kwargs, text in cases:
        out = llm.chat(conv, params, use_tqdm=False, **kwargs)[0]
        assert out.prompt_token_ids == llm.tokenizer.encode(text) and out.prompt == llm.tokenizer.decode(
            llm.tokenizer.encode(text))
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(conv, params, chat_template=TEMPLATE, continue_final_message=True)


@pytest.mark.parametrize("kwargs,field", [
    (dict(logit_bias={10**6: 1.0}), "logit_bias"), (dict(allowed_token_ids=[10**6]), "allowed_token_ids"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(prompt_logprobs=99), "prompt_logprobs"), (dict(bad_words=[""]), "bad_words"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(truncate_prompt_tokens=MAX_MODEL_LEN + 1), rf"truncate_prompt_tokens \({MAX_MODEL_LEN + 1}\) is greater than "
                                                      rf"max_model_len \({MAX_MODEL_LEN}\)"),  # vLLM's rule
])
def test_new_params_validated_at_the_edge(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        gen(llm, "hi", kwargs)


def test_vllm_keywords_at_their_defaults_and_bad_input_at_the_call(llm, tiny_llama):
    """vLLM scripts pass lora_request=None, priority=[0, ...] and chat_template_content_format: taken at those
    values, refused with a ValueError otherwise; a badly shaped conversation list is a TypeError naming it (it was
    an AttributeError); generate_stream refuses bad input at the call, before any request starts."""
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": PROMPT}], greedy, False, None, [0])[0]
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama, PROMPT, 4)
    with pytest.raises(ValueError, match="LoRA adapters are not supported"):
        llm.generate("hi", greedy, lora_request=object())
    with pytest.raises(ValueError, match=r"priority must be None or all 0, got \[1\]"):
        llm.generate("hi", greedy, priority=[1])
    conversation = [{"role": "user", "content": "hi"}]
    chat = llm.chat(conversation, greedy, use_tqdm=False, lora_request=None, chat_template_content_format="string")
    assert len(chat[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="chat_template_content_format 'openai' is not supported"):
        llm.chat(conversation, greedy, chat_template_content_format="openai")
    for bad in ([[1, 2]], [conversation, "x"], [conversation, []]):
        with pytest.raises(TypeError, match=r"conversation \d is"):
            llm.chat(bad, greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate_stream({"prompt_token_ids": [5] * MAX_MODEL_LEN}, greedy)  # no next(): raised at the call
    assert not llm.engine.get_stats().num_requests
    never_read = llm.generate_stream({"prompt_token_ids": PROMPT}, greedy)  # started at the first next() only
    del never_read
    assert not llm.engine.get_stats().num_requests

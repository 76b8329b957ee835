"""Structured outputs (vLLM's StructuredOutputsParams, xgrammar) through LLM in modes 'hybrid' and 'rapid':
JSON schema, regex, choice and EBNF outputs are valid, end with 'stop', and greedy outputs are identical in
both modes (the grammar matcher lives in whichever process samples: replayed on hand-off)."""

import json
import re

import pytest

from rapid import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "size", "n"],
          "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe"]
PROMPTS = ["Paris is", {"prompt": "hello there"}, {"prompt_token_ids": [5, 9, 30, 41, 7] * 8}]


@pytest.fixture(scope="module", params=["hybrid", "rapid"])
def llm(request, tiny_llama):
    with LLM(tiny_llama, mode=request.param, max_num_batched_tokens=16) as llm:  # the long prompt is chunked
        yield llm


def run(llm, spec, temperature=0.0, **kw):
    params = SamplingParams(temperature=temperature, max_tokens=48, structured_outputs=spec, **kw)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def check_schema(obj):
    assert set(obj) == {"ok", "size", "n"}
    assert isinstance(obj["ok"], bool) and obj["size"] in ("small", "large")
    assert isinstance(obj["n"], int) and 0 <= obj["n"] <= 99


@pytest.fixture(scope="module")
def hybrid_llm(tiny_llama):
    """The reference the rapid run's greedy outputs must equal (however the tests are selected or ordered)."""
    with LLM(tiny_llama, max_num_batched_tokens=16) as llm:
        yield llm


@pytest.mark.parametrize("name,spec", [
    ("json", StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ("regex", StructuredOutputsParams(regex=REGEX)),
    ("choice", StructuredOutputsParams(choice=CHOICES)),
    ("grammar", StructuredOutputsParams(grammar='root ::= "(" [0-9] ("+" [0-9])* ")"')),
])
def test_greedy_outputs_valid_and_identical_across_modes(llm, name, spec, request):
    outs = run(llm, spec)
    for c in outs:
        assert c.finish_reason == "stop", c
        if name == "json":
            check_schema(json.loads(c.text))
        elif name == "regex":
            assert re.fullmatch(REGEX, c.text)
        elif name == "choice":
            assert c.text in CHOICES
        else:
            assert re.fullmatch(r"\([0-9](\+[0-9])*\)", c.text)
    if llm.config.mode == "rapid":
        expected = run(request.getfixturevalue("hybrid_llm"), spec)
        assert [(c.text, c.token_ids) for c in outs] == [(c.text, c.token_ids) for c in expected]


def test_sampled_outputs_valid_and_older_name(llm):
    for c in run(llm, GuidedDecodingParams(choice=CHOICES), temperature=1.0, seed=3, n=1):
        assert c.text in CHOICES
    params = SamplingParams(temperature=1.0, max_tokens=40, guided_decoding=GuidedDecodingParams(regex=REGEX), n=3)
    out = llm.generate("Paris is", params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(re.fullmatch(REGEX, c.text) for c in out.outputs)


def test_json_object_gives_objects_never_arrays(llm):
    # OpenAI's JSON mode promises an object; xgrammar's builtin JSON grammar gave this tiny model 16 arrays in 40
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=24,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for s in range(24)]
    outs = [o.outputs[0] for o in llm.generate(["hi"] * 24, params, use_tqdm=False)]
    assert all(c.text.lstrip(" \t\r\n").startswith("{") for c in outs), [c.text for c in outs]
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(c.text), dict) for c in finished)


def test_json_object_under_preemption_is_valid_json(tiny_llama):
    # a small KV pool: requests are preempted and recomputed, their matchers rebuilt by replaying their tokens
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    with LLM(tiny_llama, kv_cache_memory_bytes=12 * 8192, enable_prefix_caching=False) as llm:
        params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec)
        outs = llm.generate([{"prompt_token_ids": [5 + i, 9, 30] * 20} for i in range(6)], params, use_tqdm=False)
        assert llm.engine.get_stats().num_preemptions > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        check_schema(json.loads(o.outputs[0].text))


@pytest.mark.parametrize("kwargs,field", [
    (dict(regex="[a-"), "regex"),
    (dict(grammar="root ::= "), "grammar"),
    (dict(json='{"type": "object", "properties": 3}'), "json"),
])
def test_bad_specs_rejected_at_the_edge(llm, kwargs, field):
    with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
        llm.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)), use_tqdm=False)


@pytest.mark.parametrize("kwargs", [{}, dict(regex="a", choice=["b"]), dict(choice=[]), dict(choice="ab")])
def test_spec_validation(kwargs):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_special_tokens_never_fill_a_grammar(llm):
    # xgrammar matched <s> / <|user|> as their literal text, which the detokenizer then dropped: 5 of 16 outputs of
    # this regex were too short; EOS still ends them
    regex = "[a-z<>/|]{12}"
    params = SamplingParams(temperature=1.5, seed=1, n=16, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(regex=regex))
    outs = llm.generate("hi", params, use_tqdm=False)[0].outputs
    special = set(llm.tokenizer.added_tokens_decoder) - {llm.tokenizer.eos_token_id}
    assert all(re.fullmatch(regex, c.text) and not special & set(c.token_ids) for c in outs), outs
    assert all(c.finish_reason == "stop" for c in outs)

"""The model's default sampling parameters, as vLLM's --generation-config: generation_config.json's temperature,
top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) are what LLM.generate / chat run without
params and what the HTTP server puts in a field a request leaves out; a value the request sets wins; 'vllm' reads
no file, a folder reads its own. On the CPU with a tiny random Llama."""

import contextlib
import json
import logging
import re
import shutil

import openai
import pytest

import rapid.entrypoints.llm as llm_module
from rapid import LLM, SamplingParams
from rapid.config import EngineArgs
from rapid.entrypoints.cli import build_parser
from rapid.entrypoints.frontend import EngineFrontend
from rapid.entrypoints.openai.api_server import build_app
from rapid.entrypoints.openai.http_server import HttpServer
from tiny import hf_greedy, make_tiny_model

MAX_LEN = 128
PROMPT = "Paris is"
CHAT = [{"role": "user", "content": "hi"}]
# what the model folder's generation_config.json recommends (besides its token ids)
MODEL_DEFAULTS = {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "max_new_tokens": 7}
MODEL_PARAMS = SamplingParams(temperature=0.0, top_k=5, top_p=0.9, min_p=0.05, max_tokens=7)


def write_generation_config(folder, values: dict) -> None:
    path = folder / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | values if path.is_file() else values))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-gen-defaults"), "llama", seed=3)
    write_generation_config(folder, MODEL_DEFAULTS | {"do_sample": False, "length_penalty": 2.0})
    return folder


@pytest.fixture(scope="module")
def llm(model):
    with LLM(str(model), max_model_len=MAX_LEN) as llm:
        yield llm


@contextlib.contextmanager
def openai_client(llm):
    """An `openai` client of the HTTP server over `llm` (port 0: a free one)."""
    frontend = EngineFrontend(llm)
    http = HttpServer(build_app(frontend, model_name="tiny"), port=0).start()
    try:
        yield openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0)
    finally:
        http.stop()
        frontend.close()


@pytest.fixture(scope="module")
def server(llm):
    with openai_client(llm) as client:
        yield client


def run(llm, prompt, params=None):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


# ---------------------------------------------------------------------- offline
def test_default_sampling_params_are_the_files(llm):
    assert llm.default_sampling_params == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
                                           "max_tokens": 7}
    assert llm.get_default_sampling_params() == MODEL_PARAMS
    assert llm.config.generation_config == "auto"


def test_generate_and_chat_without_params_use_them(llm, model):
    out = run(llm, PROMPT)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"  # max_new_tokens, not SamplingParams' 16
    # temperature 0: the greedy tokens (transformers' oracle), again on every call
    assert out.token_ids == hf_greedy(model, llm.tokenizer.encode(PROMPT), 7) == run(llm, PROMPT).token_ids
    chat = llm.chat(CHAT, use_tqdm=False)[0].outputs[0]
    assert chat.token_ids == llm.chat(CHAT, MODEL_PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    assert len(chat.token_ids) == 7
    # params given: the model's defaults play no part (SamplingParams' own: max_tokens 16)
    assert len(run(llm, PROMPT, SamplingParams(temperature=0)).token_ids) == 16


def test_vllm_ignores_the_file(model):
    assert EngineArgs.from_cli_args(build_parser().parse_args(["serve", "--generation-config", "vllm"])
                                    ).generation_config == "vllm"
    assert EngineArgs.from_cli_args(build_parser().parse_args(["generate", "hi"])).generation_config == "auto"
    with LLM(str(model), max_model_len=MAX_LEN, generation_config="vllm") as llm:
        assert llm.default_sampling_params == {} and llm.get_default_sampling_params() == SamplingParams()
        out = run(llm, PROMPT)
        greedy = run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=16))
        assert len(out.token_ids) == 16 and out.token_ids != greedy.token_ids  # temperature 1, 16 tokens


def test_a_folder_gives_its_own_file(model, tmp_path, caplog):
    other = tmp_path / "other"
    other.mkdir()
    # null and unknown keys are not read; do_sample is not either (vLLM reads only the six)
    write_generation_config(other, {"temperature": 0, "repetition_penalty": 1.3, "top_k": None, "do_sample": True,
                                    "max_new_tokens": 3})
    with caplog.at_level(logging.INFO, logger="rapid"):
        with LLM(str(model), max_model_len=MAX_LEN, generation_config=str(other)) as llm:
            assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                                       max_tokens=3)
            out = run(llm, PROMPT)
            assert out.token_ids == run(llm, PROMPT, SamplingParams(temperature=0, repetition_penalty=1.3,
                                                                    max_tokens=3)).token_ids
            assert len(out.token_ids) == 3
    said = [r for r in caplog.records if "default sampling parameters" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # as vLLM's: sampling changed for callers
    assert f"by the model's {other / 'generation_config.json'}: temperature=0.0, repetition_penalty=1.3, " \
        "max_tokens=3 (a request's own values win, but the HTTP server caps its max_tokens at 3;" \
        in said[0].getMessage()


@pytest.fixture
def no_engine(monkeypatch):
    """LLM() fails the test if it gets as far as loading the tokenizer or starting the engine."""
    def refuse(*a, **k):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(llm_module, "make_client", refuse)
    monkeypatch.setattr(llm_module, "load_tokenizer", refuse)


def test_bad_sources_are_refused_before_the_engine_starts(model, tmp_path, no_engine):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        LLM(str(model), generation_config=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="holds no generation_config.json"):
        LLM(str(model), generation_config=str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    for values, quoted in (({"top_p": 0}, "top_p 0 is not a valid default: top_p must be in (0, 1], got 0"),
                           ({"max_new_tokens": 0}, "max_new_tokens 0 is not a valid default"),
                           ({"top_k": 2.5}, "top_k 2.5 is not a valid default")):
        write_generation_config(bad, values)
        with pytest.raises(ValueError, match=re.escape(quoted)) as e:
            LLM(str(bad))
        assert str(bad / "generation_config.json") in str(e.value)
        write_generation_config(bad, {"top_p": None, "max_new_tokens": None, "top_k": None})


def test_a_bad_eos_token_id_is_named_before_the_engine_starts(model, tmp_path, no_engine):
    """generation_config.json's eos_token_id must be token ids: anything else is an error naming the file and
    the key (it was a bare "'<' not supported between instances of 'str' and 'int'")."""
    bad = tmp_path / "bad-eos"
    shutil.copytree(model, bad)
    for eos in ("</s>", [1, None], True, -1):
        write_generation_config(bad, {"eos_token_id": eos})
        with pytest.raises(ValueError, match=re.escape(f"{bad / 'generation_config.json'}: eos_token_id must be a "
                                                       f"token id (an int >= 0) or a list of them, got {eos!r}")):
            LLM(str(bad), generation_config="vllm")  # read for its EOS ids with 'vllm' too, as vLLM's


# ---------------------------------------------------------------------- the HTTP server
def test_chat_takes_the_defaults_for_what_the_request_leaves_out(llm, server):
    greedy = llm.chat(CHAT, MODEL_PARAMS, use_tqdm=False)[0].outputs[0]
    out = server.chat.completions.create(model="tiny", messages=CHAT)
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == greedy.text
    assert server.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3).usage.completion_tokens == 3
    # the request's temperature wins; top_k, top_p, min_p and max_tokens still come from the model
    texts = []
    for seed in range(4):
        got = server.chat.completions.create(model="tiny", messages=CHAT, temperature=1.0, seed=seed)
        want = llm.chat(CHAT, SamplingParams(temperature=1.0, seed=seed, top_k=5, top_p=0.9, min_p=0.05, max_tokens=7),
                        use_tqdm=False)[0].outputs[0]
        assert got.choices[0].message.content == want.text and got.usage.completion_tokens == 7
        texts.append(want.text)
    assert set(texts) != {greedy.text}  # sampled, not greedy


def test_completions_take_the_defaults_but_keep_openais_16_tokens(llm, server):
    out = server.completions.create(model="tiny", prompt=PROMPT)
    assert out.usage.completion_tokens == 16  # vLLM's (and OpenAI's) default for completions
    assert out.choices[0].text == run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=16)).text  # greedy
    got = server.completions.create(model="tiny", prompt=PROMPT, temperature=1.0, seed=1, max_tokens=5,
                                    extra_body={"top_k": 2})
    want = SamplingParams(temperature=1.0, seed=1, max_tokens=5, top_k=2, top_p=0.9, min_p=0.05)
    assert got.choices[0].text == run(llm, PROMPT, want).text


def test_completions_with_max_tokens_null_take_the_models_default(server):
    """Absent, max_tokens is OpenAI's 16; an explicit null asks for the model's default (vLLM's protocol field
    defaults to 16 and lets null through to its default)."""
    out = server.completions.create(model="tiny", prompt=PROMPT, extra_body={"max_tokens": None})
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"


def test_a_folder_caps_every_request_and_gives_its_eos_ids(model, llm, tmp_path):
    """A generation config given as a folder caps each HTTP request's max_tokens at its max_new_tokens (vLLM's
    override_max_tokens), and its eos_token_id ends generation (vLLM stops on a folder's corrected EOS ids)."""
    tokens = run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=8)).token_ids
    stop_at = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])
    other = tmp_path / "capped"
    other.mkdir()
    write_generation_config(other, {"temperature": 0.0, "max_new_tokens": 4})
    with LLM(str(model), max_model_len=MAX_LEN, generation_config=str(other)) as capped:
        with openai_client(capped) as client:
            assert client.completions.create(model="tiny", prompt=PROMPT).usage.completion_tokens == 4
            assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10).usage.completion_tokens == 4
            assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
            assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10).usage.completion_tokens \
                == 4
        assert len(run(capped, PROMPT, SamplingParams(temperature=0, max_tokens=10)).token_ids) == 10  # offline: no cap
    write_generation_config(other, {"eos_token_id": [tokens[stop_at]], "max_new_tokens": None})
    with LLM(str(model), max_model_len=MAX_LEN, generation_config=str(other)) as corrected:
        assert tokens[stop_at] in corrected.eos_token_ids
        out = run(corrected, PROMPT, SamplingParams(temperature=0, max_tokens=8))
    assert out.finish_reason == "stop" and list(out.token_ids[:stop_at]) == list(tokens[:stop_at])
    assert len(out.token_ids) <= stop_at + 1


def test_a_default_max_tokens_past_the_room_left_is_cut_to_it(model, tmp_path):
    """max_new_tokens above what max_model_len leaves: an output ends there ('length'), as vLLM's min(); a
    request's own max_tokens past it is still refused (400)."""
    other = tmp_path / "long"
    other.mkdir()
    write_generation_config(other, {"temperature": 0.0, "max_new_tokens": 100_000})
    with LLM(str(model), max_model_len=MAX_LEN, generation_config=str(other)) as llm:
        room = MAX_LEN - len(llm.chat_prompt_ids(CHAT))
        offline = llm.chat(CHAT, use_tqdm=False)[0].outputs[0]
        with openai_client(llm) as client:
            out = client.chat.completions.create(model="tiny", messages=CHAT)
            with pytest.raises(openai.BadRequestError, match="max_tokens"):
                client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=room + 1)
    assert out.usage.completion_tokens == len(offline.token_ids) == room
    assert out.choices[0].finish_reason == offline.finish_reason == "length"
    assert out.choices[0].message.content == offline.text


# ---------------------------------------------------------------------- override_generation_config
# on top of the file (auto): temperature replaced, top_k removed (null), max_new_tokens replaced
OVERRIDE = {"temperature": 1.0, "top_k": None, "max_new_tokens": 5}
OVERRIDDEN = dict(temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=5)


def test_the_override_replaces_the_files_values_offline_and_over_http(model, caplog):
    """vLLM's --override-generation-config with 'auto': the file's values, the override's keys in their place (a
    null removes one). The server fills what a request leaves out with them, and the override's max_new_tokens caps
    every request's max_tokens (vLLM's override_max_tokens); offline, a max_tokens given is not capped."""
    with caplog.at_level(logging.WARNING, logger="rapid"):
        llm = LLM(str(model), max_model_len=MAX_LEN, override_generation_config=OVERRIDE)
    with llm, openai_client(llm) as client:
        assert llm.get_default_sampling_params() == SamplingParams(**OVERRIDDEN)
        assert llm.config.override_generation_config == tuple(OVERRIDE.items())
        assert len(run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=10)).token_ids) == 10
        greedy = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
        texts = set()
        for seed in range(3):  # temperature left out: the override's 1.0, not the file's 0
            got = client.chat.completions.create(model="tiny", messages=CHAT, seed=seed)
            want = llm.chat(CHAT, SamplingParams(seed=seed, **OVERRIDDEN), use_tqdm=False)[0].outputs[0]
            assert got.choices[0].message.content == want.text
            texts.add(want.text)
        assert texts != {greedy.text}  # sampled, not greedy
        out = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=10)
        assert out.usage.completion_tokens == 5 and out.choices[0].message.content == greedy.text
        assert client.completions.create(model="tiny", prompt=PROMPT, temperature=0).usage.completion_tokens == 5
    said = [r.getMessage() for r in caplog.records if "default sampling parameters" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        f"default sampling parameters overridden by the model's {model / 'generation_config.json'} and "
        "override_generation_config: temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=5 (a request's own values "
        "win, but the HTTP server caps its max_tokens at 5;")  # the cap is said, not only the default


def test_the_override_alone_with_vllm_and_over_a_folders_file(model, tmp_path):
    """'vllm': the override's values are the only defaults. A folder: its file's, the override's keys in their
    place, and the cap on max_tokens is the result's (the override's max_new_tokens, as vLLM's)."""
    with LLM(str(model), max_model_len=MAX_LEN, generation_config="vllm",
             override_generation_config={"top_k": 3, "repetition_penalty": 1.2}) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(top_k=3, repetition_penalty=1.2)
    other = tmp_path / "other"
    other.mkdir()
    write_generation_config(other, {"temperature": 0.0, "max_new_tokens": 4})
    with LLM(str(model), max_model_len=MAX_LEN, generation_config=str(other),
             override_generation_config={"max_new_tokens": 6}) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=6)
        with openai_client(llm) as client:
            assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10).usage.completion_tokens == 6


def test_rapid_generate_takes_the_defaults_where_its_flags_are_not_given(model, monkeypatch, capsys):
    """`rapid generate` runs the model's defaults with the override on top (its start-up warning says they apply),
    the flags it is given on top of them; it ran its own 64 tokens at temperature 0 whatever the defaults said."""
    from rapid.entrypoints import cli

    ran = []
    real = LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, prompts, params=None, **kw: ran.append(params) or real(
        self, prompts, params, **kw))
    argv = ["generate", PROMPT, "--model", str(model), "--max-model-len", str(MAX_LEN), "--no-chat",
            "--override-generation-config", json.dumps(OVERRIDE)]
    assert cli.main(argv) == 0 and ran[-1] == SamplingParams(**OVERRIDDEN)
    assert "5 tokens in" in capsys.readouterr().out
    assert cli.main(argv + ["--max-tokens", "3", "--temperature", "0"]) == 0
    assert ran[-1] == SamplingParams(**OVERRIDDEN | {"max_tokens": 3, "temperature": 0.0})


def test_a_bad_override_is_refused_before_the_engine_starts(model, no_engine):
    for given, quoted in (({"top_p": 0}, "override_generation_config: top_p 0 is not a valid default: top_p must "
                                         "be in (0, 1], got 0"),
                          ({"temperature": "hot"}, "override_generation_config: temperature 'hot' is not a valid "
                                                   "default: temperature must be a float, got str 'hot'"),
                          ({"max_new_tokens": 0}, "override_generation_config: max_new_tokens 0 is not a valid"),
                          ([("temperature", 0.5)], "override_generation_config must be a dict of")):
        with pytest.raises(ValueError, match=re.escape(quoted)):
            LLM(str(model), override_generation_config=given)

"""vLLM's engine arguments that scripts pass by habit: trust_remote_code, tensor_parallel_size,
pipeline_parallel_size and disable_log_stats (LLM keywords and flags of every command), `rapid serve`'s
--enable-log-requests / --disable-log-requests, and --override-generation-config's JSON on every command (what it
does: tests/test_generation_defaults.py)."""

import logging
import re
import signal
import subprocess
import sys

import httpx
import pytest

from rapid import LLM, SamplingParams
from rapid.config import EngineArgs
from rapid.entrypoints.cli import build_parser, main
from rapid.entrypoints.frontend import EngineFrontend
from rapid.entrypoints.openai.api_server import build_app
from rapid.entrypoints.openai.http_server import HttpServer

MAX_LEN = 256
VLLM_HABITS = dict(trust_remote_code=True, tensor_parallel_size=1, pipeline_parallel_size=1, disable_log_stats=True)
REQUEST_LOGGER = "rapid.entrypoints.openai.serving.requests"
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def habit_llm(tiny_llama):
    with LLM(str(tiny_llama), max_model_len=MAX_LEN, **VLLM_HABITS) as llm:
        yield llm


def test_llm_takes_vllm_habits_and_generates_as_without_them(tiny_llama, habit_llm):
    assert all(getattr(habit_llm.engine_args, k) == v for k, v in VLLM_HABITS.items())
    out = habit_llm.generate(["Paris is", "The quick brown"], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in out)
    with LLM(str(tiny_llama), max_model_len=MAX_LEN) as plain:  # the flags change nothing
        assert habit_llm.config == plain.config
        want = plain.generate(["Paris is", "The quick brown"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("name", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_size_other_than_1_is_refused_before_any_engine_starts(tiny_llama, tmp_path, monkeypatch, name):
    import rapid.entrypoints.llm as llm_module

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(llm_module, "make_client", no_engine)
    monkeypatch.setattr(llm_module, "load_tokenizer", no_engine)
    with pytest.raises(ValueError, match=rf"^{name} must be 1, got 2: RAPID runs a model on one GPU"):
        LLM(str(tiny_llama), **{name: 2})
    with pytest.raises(ValueError, match=rf"{name} must be 1, got 8"):  # before the model folder is even read
        LLM(str(tmp_path / "absent"), **{name: 8})


def test_parallel_size_flag_is_an_error_naming_it(tiny_llama, capsys):
    assert main(["generate", "hi", "--model", str(tiny_llama), "--tensor-parallel-size", "4"]) == 2
    assert "tensor_parallel_size must be 1, got 4" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_llama), "-pp", "2"]) == 2
    assert "pipeline_parallel_size must be 1, got 2" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "hi"], ["serve"], ["batch", "in.jsonl", "out.jsonl"],
                                  ["bench", "offline"], ["bench", "serve"]], ids=" ".join)
def test_every_engine_command_takes_the_vllm_flags(argv):
    flags = ["--trust-remote-code", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
             "--disable-log-stats"]
    args = EngineArgs.from_cli_args(build_parser().parse_args(argv + flags))
    assert all(getattr(args, k) == v for k, v in VLLM_HABITS.items())
    defaults = EngineArgs.from_cli_args(build_parser().parse_args(argv))
    assert (defaults.trust_remote_code, defaults.tensor_parallel_size, defaults.disable_log_stats) == (False, 1, False)
    short = EngineArgs.from_cli_args(build_parser().parse_args(argv + ["-tp", "1", "-pp", "1"]))  # vLLM's short forms
    assert (short.tensor_parallel_size, short.pipeline_parallel_size) == (1, 1)


@pytest.mark.parametrize("argv", [["generate", "hi"], ["serve"], ["batch", "in.jsonl", "out.jsonl"],
                                  ["bench", "offline"], ["bench", "serve"]], ids=" ".join)
def test_token_counts_as_vllm_writes_them_and_enable_chunked_prefill(argv, capsys):
    for given, value in (("4096", 4096), ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("2M", 2 * 2**20)):
        args = build_parser().parse_args(argv + ["--max-model-len", given, "--max-num-batched-tokens", given])
        assert (args.max_model_len, args.max_num_batched_tokens) == (value, value)
    for bad in ("1.5K", "k", "12x", "0.5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv + ["--max-model-len", bad])
        assert "is not a whole number of tokens" in capsys.readouterr().err
    assert EngineArgs.from_cli_args(build_parser().parse_args(argv + ["--enable-chunked-prefill"])) \
        .enable_chunked_prefill is True


def test_enable_chunked_prefill_false_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="RAPID always chunks prefill"):
        LLM(str(tiny_llama), enable_chunked_prefill=False)
    with LLM(str(tiny_llama), max_model_len=MAX_LEN, enable_chunked_prefill=True) as llm:
        assert llm.generate("Paris is", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("argv", [["generate", "hi"], ["serve"], ["batch", "in.jsonl", "out.jsonl"],
                                  ["bench", "offline"], ["bench", "serve"]], ids=" ".join)
def test_every_engine_command_takes_override_generation_config_as_json(argv):
    given = '{"temperature": 0.5, "top_k": null, "max_new_tokens": 64}'
    args = EngineArgs.from_cli_args(build_parser().parse_args(argv + ["--override-generation-config", given]))
    assert args.override_generation_config == {"temperature": 0.5, "top_k": None, "max_new_tokens": 64}
    assert EngineArgs.from_cli_args(build_parser().parse_args(argv)).override_generation_config is None


@pytest.mark.parametrize("given, said", [
    ("{temperature: 0.5}", "'{temperature: 0.5}' is not valid JSON (Expecting property name enclosed in double "
                           "quotes: line 1 column 2 (char 1)); give a JSON object such as"),
    ('[["temperature", 0.5]]', """'[["temperature", 0.5]]' is an array, not a JSON object"""),
    ("0.5", "'0.5' is a number, not a JSON object"),
    ("null", "'null' is null, not a JSON object"),
])
def test_override_generation_config_that_is_no_json_object_is_a_usage_error(given, said, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--override-generation-config", given])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --override-generation-config: {said}" in err, err


def test_override_generation_config_value_is_an_error_naming_it(tiny_llama, capsys):
    argv = ["generate", "hi", "--model", str(tiny_llama), "--override-generation-config"]
    assert main(argv + ['{"top_p": 2}']) == 2
    assert "override_generation_config: top_p 2 is not a valid default: top_p must be in (0, 1], got 2" \
        in capsys.readouterr().err


def test_serve_takes_the_log_requests_flags():
    parse = build_parser().parse_args
    assert parse(["serve"]).enable_log_requests is False
    assert parse(["serve", "--disable-log-requests"]).enable_log_requests is False
    ns = parse(["serve", "--trust-remote-code", "--disable-log-requests", "--enable-log-requests"])
    assert ns.enable_log_requests is True and ns.trust_remote_code is True
    with pytest.raises(SystemExit):  # serve's own flags: the other commands do not take them
        parse(["generate", "hi", "--enable-log-requests"])


def _post(url: str) -> dict:
    body = {"model": "tiny", "prompt": "Paris is", "max_tokens": 5, "temperature": 0, "n": 2, "seed": 11}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_log_requests_logs_each_request_received(habit_llm, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    frontend = EngineFrontend(habit_llm)
    quiet = HttpServer(build_app(frontend, model_name="tiny"), port=0).start()
    loud = HttpServer(build_app(frontend, model_name="tiny", log_requests=True), port=0).start()
    try:
        _post(quiet.url)
        assert not [r for r in caplog.records if r.name == REQUEST_LOGGER]  # off by default
        out = _post(loud.url)
    finally:
        quiet.stop()
        loud.stop()
        frontend.close()
    lines = [r.getMessage() for r in caplog.records if r.name == REQUEST_LOGGER]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in caplog.records if r.name == REQUEST_LOGGER)
    prompt_tokens = out["usage"]["prompt_tokens"]
    for line in lines:  # one per engine request (n=2): its id, the response's, the prompt length, the params
        assert re.match(rf"received request \w+-[01] \(response {out['id']}\): prompt of {prompt_tokens} tokens, "
                        r"SamplingParams\(", line), line
        assert "max_tokens=5" in line and "temperature=0.0" in line
    # the params each engine request runs: choice i of seed 11 samples with seed 11 + i
    assert {(re.search(r"request (\S+)", line).group(1)[-2:], re.search(r"seed=(\d+)", line).group(1))
            for line in lines} == {("-0", "11"), ("-1", "12")}


@pytest.mark.slow
def test_rapid_serve_enable_log_requests_at_the_default_log_level(tiny_llama):
    proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", str(tiny_llama), "--port", "0",
                             "--max-model-len", str(MAX_LEN), "--served-model-name", "tiny", "--no-zmq",
                             "--trust-remote-code", "--tensor-parallel-size", "1", "--disable-log-stats",
                             "--disable-log-requests", "--enable-log-requests"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+)/v1", line).group(1)
        out = _post(url)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    logged = [ln for ln in err.splitlines() if "received request" in ln]
    assert len(out["choices"]) == 2
    assert len(logged) == 2 and all(f"(response {out['id']})" in ln and "INFO" in ln for ln in logged), err

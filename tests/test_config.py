"""Configuration once: EngineArgs holds every engine option; the CLI flags, LLM's keywords and the validated
EngineConfig all derive from it, with the same defaults."""

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rapid.config import (AUTO_MAX_NUM_SEQS, CacheConfig, EngineArgs, EngineConfig, RapidConfig, SchedulerConfig,
                          fit_to_pool, seqs_for_pool)
from rapid.entrypoints.cli import FRONTIER_OWN, build_parser, main, version
from rapid.protocol.worker import WorkerArgs, decode_args, encode_args

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}
SUB_CONFIGS = (CacheConfig, SchedulerConfig, RapidConfig, EngineConfig)
ENGINE_COMMANDS = (["generate", "hi"], ["serve"], ["batch", "in.jsonl", "out.jsonl"], ["bench", "offline"],
                   ["bench", "serve"])
# LLM's keyword arguments before EngineArgs: every one must keep working.
LLM_KEYWORDS = ("tokenizer", "dtype", "mode", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "block_size", "kv_cache_memory_bytes", "gpu_memory_utilization", "enable_prefix_caching",
                "enforce_eager", "attention_backend", "prefill_attention", "load_format", "seed",
                "prefill_sm_percentage", "decode_sm_percentage", "use_mps", "worker_start_timeout_s",
                "slo_ttft_ms", "slo_tpot_ms", "placement", "skip_tokenizer_init")
# vLLM's arguments accepted for its scripts and checked, that reach no config (tests/test_vllm_compat_args.py)
VLLM_ONLY = ("trust_remote_code", "tensor_parallel_size", "pipeline_parallel_size", "disable_log_stats",
             "enable_chunked_prefill")


@pytest.fixture
def folder(tmp_path) -> str:
    """A model folder holding only config.json: enough for EngineArgs (no weights are read)."""
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def subparser(argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that `rapid *argv` ends in."""
    parser = build_parser()
    for name in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    return parser


# ---------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv", ENGINE_COMMANDS + (["bench", "frontier", "--mode", "hybrid"],), ids=" ".join)
def test_every_field_is_a_flag_with_help(argv):
    parser = subparser(argv)
    flags = {opt: a for a in parser._actions for opt in a.option_strings}
    skipped = FRONTIER_OWN if "frontier" in argv else ()
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if name in skipped:
            continue
        assert flag in flags, f"{flag} missing from rapid {' '.join(argv)}"
        action = flags[flag]
        assert action.dest == name and action.help and action.help.strip()
        assert ("(GPU only)" in action.help) == bool(f.metadata.get("gpu_only")), flag
        if isinstance(f.default, bool):
            assert "--no-" + flag[2:] in flags, f"{flag} is a bool: it needs --no-{flag[2:]}"
    assert "SmolLM2-135M-Instruct" in flags["--model"].help
    parser.format_help()  # every help string formats (no stray %)


@pytest.mark.parametrize("argv", ENGINE_COMMANDS, ids=" ".join)
def test_cli_defaults_are_engine_args_defaults(argv):
    # rapid serve runs mode hybrid's step loop in its own process, away from the HTTP threads; rapid bench serve does
    # the same, away from its load generator
    want = EngineArgs(engine_process=True) if argv in (["serve"], ["bench", "serve"]) else EngineArgs()
    assert EngineArgs.from_cli_args(build_parser().parse_args(argv)) == want


def test_frontier_sets_its_own_engine_options():
    ns = build_parser().parse_args(["bench", "frontier", "--mode", "rapid", "--dtype", "float16"])
    assert ns.max_model_len == 4096 and ns.dtype == "float16" and not hasattr(ns, "max_num_seqs")


def test_bool_flags_and_values_reach_engine_args():
    ns = build_parser().parse_args(["generate", "hi", "--no-enable-prefix-caching", "--no-use-mps", "--enforce-eager",
                                    "--block-size", "32", "--slo-tpot-ms", "40", "--mode", "rapid"])
    args = EngineArgs.from_cli_args(ns)
    assert args == EngineArgs(enable_prefix_caching=False, use_mps=False, enforce_eager=True, block_size=32,
                              slo_tpot_ms=40.0, mode="rapid")


def test_bad_cli_value_is_an_error_naming_it(folder, capsys):
    assert main(["generate", "hi", "--model", folder, "--block-size", "12"]) == 2
    assert "block_size must be a positive power of two, got 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mode", "fast"])
    # no command: the error names what was given and the commands (exit status 2, argparse's)
    for argv, said in ((["--bogus"], "unrecognized arguments: --bogus; choose a command"), ([], "choose a command")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_version():
    out = subprocess.run([sys.executable, "-m", "rapid.entrypoints.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"rapid {version()}"
    assert re.fullmatch(r"rapid \d+\.\d+\S*", out.stdout.strip())


# ---------------------------------------------------------------------- EngineArgs -> EngineConfig
def test_defaults_are_written_once():
    assert FIELDS["max_model_len"].default is None  # the one exception: None = the model's max_position_embeddings
    for cls in SUB_CONFIGS:
        for f in dataclasses.fields(cls):
            if f.name in FIELDS and f.name != "max_model_len" and f.default is not dataclasses.MISSING:
                assert FIELDS[f.name].default == f.default, f"{cls.__name__}.{f.name}"


def test_every_field_reaches_the_engine_config(folder):
    given = dict(model=folder, tokenizer=folder, skip_tokenizer_init=False, mode="rapid", dtype="bfloat16",
                 device="cpu", load_format="dummy", seed=7, max_model_len=256, max_num_seqs=8,
                 max_num_batched_tokens=512, block_size=32, kv_cache_memory_bytes=2**20, gpu_memory_utilization=0.5,
                 enable_prefix_caching=False, enforce_eager=True, async_scheduling=False, attention_backend="reference",
                 prefill_attention="cudnn", prefill_sm_percentage=60, decode_sm_percentage=40, use_mps=False,
                 worker_start_timeout_s=10.0, decode_lookahead_blocks=3, slo_tpot_ms=25.0, slo_ttft_ms=500.0,
                 placement="atom", admission_reserve=0.5, engine_process=True,
                 second_prefill_sm_percentage=30, generation_config="vllm",
                 override_generation_config={"top_p": 0.5}, kv_cache_dtype="fp8_e5m2")
    assert set(given) == set(FIELDS) - set(VLLM_ONLY), "a new EngineArgs field needs a value here"
    for name, value in given.items():
        assert value != FIELDS[name].default or name == "skip_tokenizer_init", name
    cfg = EngineArgs(**given).create_engine_config()
    seen = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for part in (cfg.cache, cfg.scheduler, cfg.rapid):
        seen |= {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
    for name, value in given.items():
        if name != "skip_tokenizer_init":  # the override's dict is kept as its (key, value) pairs
            assert seen[name] == (tuple(value.items()) if name == "override_generation_config" else value), name


def test_model_folder_sets_the_length_and_the_tokenizer(folder):
    cfg = EngineArgs(model=folder).create_engine_config()
    assert (cfg.model, cfg.tokenizer, cfg.scheduler.max_model_len) == (folder, folder, 512)
    assert EngineArgs(model=folder, skip_tokenizer_init=True).create_engine_config().tokenizer is None
    assert EngineArgs(model=Path(folder), max_model_len=100).create_engine_config().scheduler.max_model_len == 100


@pytest.mark.parametrize("kwargs, quoted", [
    (dict(block_size=12), "got 12"),
    (dict(max_model_len=1000), "max_model_len (1000) exceeds the model's max_position_embeddings (512)"),
    (dict(max_model_len=0), "got 0"),
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer, got 0"),
    (dict(max_num_batched_tokens=-5), "got -5"),
    (dict(kv_cache_memory_bytes=0), "got 0"),
    # the folder's model (2 layers, 2 KV heads of 16) keeps 2 * 2 * 16 * 2 * 16 * 2 = 4096 bytes in a 16-bit block
    (dict(kv_cache_memory_bytes=10), "kv_cache_memory_bytes (10) holds no KV block: one block of 16 tokens takes 4096"),
    (dict(kv_cache_memory_bytes=6000, device="cpu"), "(6000) holds no KV block: one block of 16 tokens takes 8192 "
                                                     "bytes of this model's cache in float32"),
    (dict(gpu_memory_utilization=1.5), "got 1.5"),
    (dict(prefill_sm_percentage=101), "got 101"),
    (dict(decode_sm_percentage=0), "got 0"),
    (dict(worker_start_timeout_s=0), "got 0"),
    (dict(decode_lookahead_blocks=0), "got 0"),
    (dict(slo_tpot_ms=-1.0), "slo_tpot_ms must be a positive number of milliseconds or None, got -1.0"),
    (dict(slo_ttft_ms=float("inf")), "slo_ttft_ms must be"),
    (dict(placement="best"), "placement must be one of"),
    (dict(mode="fast"), "got 'fast'"),
    (dict(dtype="int8"), "got 'int8'"),
    (dict(device="gpu"), "got 'gpu'"),
    (dict(attention_backend="xformers"), "got 'xformers'"),
    (dict(prefill_attention="mem"), "got 'mem'"),
    (dict(load_format="gguf"), "got 'gguf'"),
    (dict(enable_prefix_caching="yes"), "got 'yes'"),
    (dict(skip_tokenizer_init="no"), "got 'no'"),
    (dict(generation_config=""), "generation_config must be 'auto', 'vllm' or a folder"),
    (dict(override_generation_config={"temperature": -1}),
     "override_generation_config: temperature -1 is not a valid default: temperature must be"),
    (dict(override_generation_config={"top_k": 2.5}), "override_generation_config: top_k 2.5 is not a valid default"),
    (dict(override_generation_config={"max_new_tokens": True}), "max_new_tokens True is not a valid default"),
    (dict(override_generation_config="temperature=0.5"), "override_generation_config must be a dict of "
                                                         "generation_config.json keys to values, such as"),
    (dict(override_generation_config={1: 0.5}), "override_generation_config must be a dict"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size must be 1, got 2: RAPID runs a model on one GPU"),
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be 1, got 0"),
    (dict(tensor_parallel_size=True), "got True"),
    (dict(trust_remote_code="yes"), "trust_remote_code must be True or False, got 'yes'"),
    (dict(disable_log_stats=1), "disable_log_stats must be True or False, got 1"),
])
def test_bad_values_are_value_errors_quoting_them(folder, kwargs, quoted):
    with pytest.raises(ValueError, match=re.escape(quoted)) as e:
        EngineArgs(model=folder, **kwargs).create_engine_config()
    assert next(iter(kwargs)) in str(e.value)


def test_override_generation_config_is_kept_as_hashable_pairs(folder, caplog):
    """vLLM's dict, kept in the frozen EngineConfig as ((key, value), ...) in generation_config.json's order, values
    as SamplingParams holds them; keys vLLM does not read are dropped with one warning; the pairs survive
    dataclasses.replace and the msgpack trip to an engine process."""
    given = {"max_tokens": 5, "top_k": -1, "do_sample": True, "min_p": None, "temperature": 1}
    with caplog.at_level(logging.WARNING, logger="rapid"):
        cfg = EngineArgs(model=folder, override_generation_config=given).create_engine_config()
    assert cfg.override_generation_config == (("temperature", 1.0), ("top_k", 0), ("min_p", None))
    warned = [r.getMessage() for r in caplog.records if "override_generation_config" in r.getMessage()]
    assert len(warned) == 1 and "ignoring 'max_tokens' (did you mean 'max_new_tokens'?), 'do_sample': only " \
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens are read" in warned[0]
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert dataclasses.replace(cfg, seed=1).override_generation_config == cfg.override_generation_config
    sent = WorkerArgs(name="core", config=cfg, endpoints={}, log_path="", log_level=0, eos_token_ids=(2,))
    assert decode_args(encode_args(sent)).config == cfg
    assert EngineArgs(model=folder).create_engine_config().override_generation_config == ()
    assert EngineArgs(model=folder, override_generation_config={}).create_engine_config() == \
        EngineArgs(model=folder).create_engine_config()


def test_values_are_checked_before_the_model_folder(tmp_path):
    with pytest.raises(ValueError, match="got 12"):
        EngineArgs(model=str(tmp_path / "missing"), block_size=12).create_engine_config()
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        EngineArgs(model=str(tmp_path / "missing")).create_engine_config()


# ---------------------------------------------------------------------- LLM
def test_llm_keywords_are_engine_args(folder, monkeypatch):
    import rapid.entrypoints.llm as llm_module
    from rapid import LLM

    params = inspect.signature(LLM).parameters
    assert list(params) == list(FIELDS) and set(LLM_KEYWORDS) <= set(params)
    assert params["max_num_seqs"].default is None and params["model"].default is None

    def no_engine(*a, **k):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(llm_module, "make_client", no_engine)
    monkeypatch.setattr(llm_module, "load_tokenizer", no_engine)
    with pytest.raises(TypeError, match=r"'max_num_seq' \(did you mean 'max_num_seqs'\?\)"):
        LLM(folder, max_num_seq=4)
    with pytest.raises(TypeError, match="'colour'.*the engine arguments are model, tokenizer"):
        LLM(folder, colour="red")
    with pytest.raises(ValueError, match="got 0.0"):
        LLM(folder, gpu_memory_utilization=0.0)


@pytest.mark.slow
def test_llm_cli_and_engine_args_build_the_same_config(tiny_llama):
    from rapid import LLM

    model = str(tiny_llama)
    cli = EngineArgs.from_cli_args(build_parser().parse_args(["generate", "hi", "--model", model]))
    with LLM(model) as llm:
        built = cli.create_engine_config()
        assert built == EngineArgs(model=model).create_engine_config() and llm.engine_args == cli
        # the engine fits max_num_seqs to its KV pool (the tiny model's 256 MiB CPU pool holds many tokens)
        pool_tokens = llm.engine.num_blocks * built.cache.block_size
        assert built.scheduler.max_num_seqs is None
        assert llm.engine.max_num_seqs == seqs_for_pool(pool_tokens, built.scheduler.max_model_len)
        assert llm.config == fit_to_pool(built, llm.engine.num_blocks)
        llm.engine.max_num_seqs = 264  # as a restart that re-measured the pool would set it
        assert llm.config.scheduler.max_num_seqs == 264 and llm.config.cache == built.cache
    with LLM.from_engine_args(dataclasses.replace(cli, max_num_seqs=4, skip_tokenizer_init=True)) as llm:
        assert llm.config.scheduler.max_num_seqs == 4 and llm.tokenizer is None
        with pytest.raises(ValueError, match="chat needs a tokenizer"):
            llm.chat([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------- import weight
@pytest.mark.parametrize("modules", [("rapid.client", "rapid.protocol"), ("rapid.config", "rapid.entrypoints.cli"),
                                     ("rapid.engine.mp_client", "rapid.worker.memory_check")])  # the engine's frontend
def test_light_modules_load_no_torch(modules):
    code = (f"import sys, {', '.join(modules)}\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_max_num_seqs_is_fitted_to_the_kv_pool():
    """None: the full-length sequences the pool holds, a multiple of 8, within
    AUTO_MAX_NUM_SEQS; a value the user gave is kept whatever the pool."""
    low, high = AUTO_MAX_NUM_SEQS
    assert seqs_for_pool(1_000, 4096) == low and seqs_for_pool(10**9, 4096) == high
    # an 8B model's pool on the H200 holds an estimated 800k tokens: under 256 full 4096-token sequences: the floor (256,
    # measured 24% faster than pool / 1024 there); at max_model_len 2048, 405 -> 400
    assert seqs_for_pool(830_000, 4096) == 256 and seqs_for_pool(830_000, 2048) == 400
    cfg = EngineConfig(model="m", tokenizer=None, scheduler=SchedulerConfig(max_model_len=1024))
    assert cfg.scheduler.max_num_seqs is None and cfg.scheduler.max_num_seqs_bound == high
    fitted = fit_to_pool(cfg, num_blocks=830_000 // cfg.cache.block_size)
    assert fitted.scheduler.max_num_seqs == 808 and fitted.cache == cfg.cache
    given = dataclasses.replace(cfg, scheduler=SchedulerConfig(max_num_seqs=12))
    assert fit_to_pool(given, num_blocks=10**6) is given
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer, got 0"):
        SchedulerConfig(max_num_seqs=0)

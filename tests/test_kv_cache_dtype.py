"""kv_cache_dtype (vLLM's option): a float8 KV pool, one byte an element. The oracle is transformers whose attention
reads every key and value rounded to the same float8 format (tiny.hf_greedy's kv_dtype): greedy tokens must equal
it in every mode, through chunked prefill, the prefix cache, preemption and disagg's hand-off copies."""

import random

import pytest
import torch

from rapid import LLM, SamplingParams
from rapid.config import EngineArgs
from rapid.entrypoints.cli import build_parser, main
from tiny import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
           "bfloat16": torch.bfloat16}


def prompts(seed=0, lengths=(1, 5, 17, 33, 64, 90)):
    rng = random.Random(seed)
    return [[rng.randrange(5, 300) for _ in range(n)] for n in lengths]


def run(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY,
                                                          use_tqdm=False)]


@pytest.fixture(scope="module")
def oracles(tiny_llama):
    """Per format: transformers' greedy tokens reading float8 keys and values; and with its own (float32) cache."""
    ps = prompts()
    fp8 = {name: [hf_greedy(tiny_llama, p, GREEDY.max_tokens, kv_dtype=dt) for p in ps]
           for name, dt in (("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2))}
    return ps, fp8, [hf_greedy(tiny_llama, p, GREEDY.max_tokens) for p in ps]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_greedy_equals_transformers_reading_float8_kv(tiny_llama, oracles, kv_cache_dtype):
    ps, fp8, plain = oracles
    expected = fp8[kv_cache_dtype]
    assert expected != plain, "this model's float8 oracle should differ from its float32 one (else it tests nothing)"
    # chunked prefill (16-token chunks read the earlier chunks back from the pool) and the prefix cache
    with LLM(tiny_llama, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=16) as llm:
        assert run(llm, ps) == expected
        again = llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    # the second time every prompt's full blocks came from the prefix cache, read back from the float8 pool
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 16 * 16 for p in ps]  # the last token computed


def test_bfloat16_kv_under_a_float32_model_equals_transformers_reading_bfloat16(tiny_llama, oracles):
    """kv_cache_dtype="bfloat16" (vLLM accepts it too): a float32 model on the CPU with a 16-bit pool, half the bytes
    of a block; the oracle reads keys and values rounded to bf16."""
    ps = oracles[0]
    with LLM(tiny_llama, kv_cache_dtype="bfloat16", kv_cache_memory_bytes=16 * 8192) as llm:
        assert llm.engine.num_blocks == 32
        got = run(llm, ps)
    assert got == [hf_greedy(tiny_llama, p, GREEDY.max_tokens, kv_dtype=torch.bfloat16) for p in ps]


def test_float8_pool_holds_four_times_the_float32_blocks(tiny_llama):
    # one block of 16 tokens: 2 layers * 2 * 16 * 2 heads * 16 dims = 2 KiB in float8, 8 KiB in float32 (the CPU's)
    with LLM(tiny_llama, kv_cache_memory_bytes=16 * 8192) as wide:
        assert wide.engine.num_blocks == 16
    with LLM(tiny_llama, kv_cache_memory_bytes=16 * 8192, kv_cache_dtype="fp8") as llm:
        assert llm.engine.num_blocks == 64


def test_float8_kv_greedy_survives_preemption(tiny_llama):
    ps = prompts(seed=5)[2:]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(tiny_llama, kv_cache_memory_bytes=10 * 2048, enable_prefix_caching=False, kv_cache_dtype="fp8") as llm:
        assert llm.engine.num_blocks == 10
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert llm.engine.get_stats().num_preemptions > 0, "the KV budget was meant to force preemption"
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(tiny_llama, p, 40, kv_dtype=torch.float8_e4m3fn)
                                                      for p in ps]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rapid", "disagg"])
def test_float8_kv_in_the_multi_process_modes(tiny_llama, oracles, mode):
    """rapid: both workers map one float8 pool; disagg: the hand-off copies float8 blocks between two pools."""
    ps, fp8, _ = oracles
    with LLM(tiny_llama, mode=mode, kv_cache_dtype="fp8", max_num_batched_tokens=32) as llm:
        assert run(llm, ps) == fp8["fp8"]


def test_kv_cache_dtype_is_checked_at_the_edge(tiny_llama):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'bfloat16', 'fp8', 'fp8_e4m3', "
                                         r"'fp8_e5m2'\), got 'int8'"):
        LLM(tiny_llama, kv_cache_dtype="int8")
    # a pool too small for one float8 block names the float8 block's size (2 KiB here)
    with pytest.raises(ValueError, match="one block of 16 tokens takes 2048 bytes of this model's cache in fp8"):
        EngineArgs(model=str(tiny_llama), kv_cache_dtype="fp8", kv_cache_memory_bytes=1000).create_engine_config()


def test_float8_on_a_gpu_older_than_compute_capability_8_9_is_refused_with_the_way_out():
    from rapid.attention.kv_dtype import float8_unsupported

    why = float8_unsupported("fp8", "triton", (8, 0))  # an A100: Triton has no float8 conversions there
    assert "compute capability 8.9 or newer" in why and "this GPU is 8.0" in why and "'bfloat16'" in why
    assert float8_unsupported("fp8_e5m2", "triton", (7, 5))
    assert float8_unsupported("fp8", "triton", (8, 9)) is None and float8_unsupported("fp8", "triton", (9, 0)) is None
    assert float8_unsupported("fp8", "reference", (8, 0)) is None  # torch ops convert float8 anywhere
    assert float8_unsupported("bfloat16", "triton", (7, 0)) is None and float8_unsupported("auto", "triton", (8, 0)) is None


@pytest.mark.parametrize("value", sorted(FORMATS))
def test_cli_takes_kv_cache_dtype(value):
    args = EngineArgs.from_cli_args(build_parser().parse_args(["generate", "hi", "--kv-cache-dtype", value]))
    assert args.kv_cache_dtype == value
    assert EngineArgs.from_cli_args(build_parser().parse_args(["serve"])).kv_cache_dtype == "auto"


def test_cli_refuses_an_unknown_kv_cache_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--kv-cache-dtype", "int4"])
    assert "--kv-cache-dtype" in capsys.readouterr().err

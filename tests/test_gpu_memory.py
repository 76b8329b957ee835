"""KV sizing from measured memory on the GPU (skipped without CUDA): the profile measures something that
grows with the token budget, the hybrid engine stays within its plan, rapid workers report their peaks."""

import gc

import pytest
import torch

from rapid import LLM, SamplingParams
from rapid.config import EngineConfig, SchedulerConfig
from rapid.worker.loading import load_model
from rapid.worker.memory import ALLOC_ROUND, profile_forward_memory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _free_cached() -> None:
    """Give this test process's cached blocks back, so that an engine started next does not count them."""
    gc.collect()
    torch.cuda.empty_cache()


def test_profile_peak_is_positive_and_grows_with_the_token_budget(tiny_llama):
    dev = torch.device("cuda", torch.cuda.current_device())
    config = EngineConfig(model=str(tiny_llama), tokenizer=None, device="cuda",
                          scheduler=SchedulerConfig(max_model_len=512))
    model, _ = load_model(config, dev)
    profile_forward_memory(model, dev, 64, 8, 512, 16)  # warm-up: kernels, cuBLAS handles
    small = profile_forward_memory(model, dev, 64, 8, 512, 16)
    large = profile_forward_memory(model, dev, 8192, 8, 512, 16)
    assert small.prefill_bytes > 0 and small.decode_bytes > 0
    assert large.prefill_bytes > small.prefill_bytes
    assert large.decode_bytes > 0
    del model
    _free_cached()


def test_hybrid_startup_stays_within_its_plan(tiny_llama):
    _free_cached()
    with LLM(tiny_llama, mode="hybrid", max_num_batched_tokens=256, max_num_seqs=8,
             gpu_memory_utilization=0.3) as llm:
        setup = llm.engine.setup  # the hybrid engine's model and KV pool, in its private arena
        (plan,) = setup.memory_plans
        assert plan.peak_activation_bytes > 0 and plan.graph_bytes_allowance > 0 and plan.non_torch_bytes > 0
        # this process's peak since the profile (arena with weights and KV pool, compile warm-up, graph capture)
        used = torch.cuda.max_memory_reserved(setup.device)
        allowed = setup.allowed_bytes["hybrid"]
        assert 0 < used <= allowed + ALLOC_ROUND, (used, allowed, plan)  # ALLOC_ROUND: the pool's rounding
        out = llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4


def test_rapid_workers_report_their_peaks(tiny_llama):
    _free_cached()
    with LLM(tiny_llama, mode="rapid", max_num_batched_tokens=64, max_num_seqs=8,
             gpu_memory_utilization=0.3) as llm:
        started = llm.engine.started
        plan = started["decode"].allowed_bytes  # the owner planned for both workers
        for name in ("decode", "prefill"):
            assert started[name].max_reserved_bytes > 0, name
            assert plan[name] > 0, name
        assert plan["decode"] > plan["prefill"]  # the owner's allocator also holds the arena
        out = llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4

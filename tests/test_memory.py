"""KV sizing from measured per-process memory (rapid/runtime/memory.py): the arithmetic on hand-computed
cases, and the CPU side of the profile (zeros; a profile step writes nothing to the KV pool)."""

import logging
from types import SimpleNamespace

import msgspec
import pytest
import torch

from rapid.config import CacheConfig, EngineConfig, SchedulerConfig
from rapid.protocol.worker import WorkerReady
from rapid.worker import memory
from rapid.worker.loading import kv_block_bytes, load_model, num_kv_blocks
from rapid.worker.memory import (
    ForwardPeaks, ProcessMemory, check_process_memory, kv_budget_bytes, non_torch_bytes, prefill_lens,
    process_memory, profile_forward_memory, run_profile_step, scratch_kv_pool,
)

GiB, MiB = 2**30, 2**20


def test_budget_two_processes_exact():
    decode = ProcessMemory(1 * GiB, 1 * GiB, 512 * MiB, "decode")
    prefill = ProcessMemory(3 * GiB, 3 * GiB, 512 * MiB, "prefill")
    # 80 GiB * 0.75 = 60 GiB; - 16 GiB weights - (1 + 1 + 0.5) - (3 + 3 + 0.5) = 35 GiB
    assert kv_budget_bytes(80 * GiB, 0.75, 16 * GiB, [decode, prefill]) == 35 * GiB
    assert decode.total_bytes == 2 * GiB + 512 * MiB and prefill.torch_bytes == 6 * GiB


def test_budget_odd_numbers_are_integers():
    procs = [ProcessMemory(1000, 2000, 3000), ProcessMemory(7, 11, 13)]
    assert kv_budget_bytes(1_000_003, 0.5, 100_000, procs) == 500_001 - 100_000 - 6000 - 31


def test_budget_too_small_quotes_every_number():
    procs = [ProcessMemory(1 * GiB, GiB // 2, GiB // 2, "decode"), ProcessMemory(GiB, GiB // 2, GiB // 2, "prefill")]
    # 16 GiB * 0.5 = 8 GiB - 6 GiB - 2 GiB - 2 GiB = -2 GiB
    with pytest.raises(ValueError) as e:
        kv_budget_bytes(16 * GiB, 0.5, 6 * GiB, procs, block_bytes=4096)
    msg = str(e.value)
    for part in ("gpu_memory_utilization=0.5", "16.00 GiB", "8.00 GiB", "6.00 GiB", "-2.00 GiB", "4096 bytes",
                 "decode: activations 1.00 GiB + graphs 0.50 GiB + non-torch 0.50 GiB", "prefill:",
                 "raise gpu_memory_utilization"):
        assert part in msg, part


def test_budget_of_exactly_one_block():
    assert kv_budget_bytes(1000, 1.0, 400, [ProcessMemory(100, 100, 100)], block_bytes=300) == 300
    with pytest.raises(ValueError, match="less than one KV block"):
        kv_budget_bytes(1000, 1.0, 401, [ProcessMemory(100, 100, 100)], block_bytes=300)


def test_utilization_is_a_share_of_the_whole_gpu_not_of_free_memory(tiny_llama, monkeypatch):
    """num_kv_blocks on 'CUDA' reads only the total memory; free memory is never consulted."""
    from rapid.model.config import ModelConfig

    total = 8 * GiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))

    def no_free_memory(*a, **k):
        raise AssertionError("sizing must not read free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_free_memory)
    cfg = ModelConfig.from_folder(tiny_llama)
    config = EngineConfig(model=str(tiny_llama), tokenizer=None, cache=CacheConfig(gpu_memory_utilization=0.5))
    per_block = kv_block_bytes(cfg, 16, torch.bfloat16)
    procs = [ProcessMemory(GiB, GiB // 2, GiB // 4, "decode"), ProcessMemory(GiB // 4, 0, GiB // 4, "prefill")]
    blocks = num_kv_blocks(config, cfg, torch.bfloat16, torch.device("cuda", 0), GiB, procs)
    assert blocks == (4 * GiB - GiB - (GiB + GiB // 2 + GiB // 4) - GiB // 2) // per_block
    given = EngineConfig(model=str(tiny_llama), tokenizer=None, cache=CacheConfig(kv_cache_memory_bytes=per_block * 7))
    assert num_kv_blocks(given, cfg, torch.bfloat16, torch.device("cuda", 0), 10 * GiB, procs) == 7


def test_allocator_rounding():
    assert memory.rounded(1) == 2 * MiB and memory.rounded(2 * MiB) == 2 * MiB
    assert memory.rounded(2 * MiB + 1) == 4 * MiB


def test_process_memory_per_role():
    peaks = ForwardPeaks(prefill_bytes=300, decode_bytes=50)
    assert process_memory("hybrid", peaks, 7, prefill=True, decode=True, graphs=True) == \
        ProcessMemory(300, 350, 7, "hybrid")
    assert process_memory("decode", peaks, 7, prefill=False, decode=True, graphs=True) == \
        ProcessMemory(50, 50, 7, "decode")
    assert process_memory("prefill", peaks, 7, prefill=True, decode=False, graphs=False) == \
        ProcessMemory(300, 0, 7, "prefill")
    # rapid's decode worker under the adaptive placement: it also runs mixed steps, in graphs of their own
    assert process_memory("decode", peaks, 7, prefill=True, decode=True, graphs=True) == \
        ProcessMemory(300, 350, 7, "decode")


def test_paged_prefill_attention_only_where_graphs_run():
    """'paged' (the default) pays inside whole CUDA graphs; with enforce_eager a process runs flash SDPA. A choice
    other than paged is kept."""
    from rapid.worker.loading import prefill_attention

    assert EngineConfig(model="m", tokenizer=None).prefill_attention == "paged"
    assert prefill_attention(EngineConfig(model="m", tokenizer=None)) == "paged"
    assert prefill_attention(EngineConfig(model="m", tokenizer=None, enforce_eager=True)) == "flash"
    assert prefill_attention(EngineConfig(model="m", tokenizer=None, enforce_eager=True, prefill_attention="cudnn")) \
        == "cudnn"


def test_roles_that_capture_prefill_graphs():
    """Mixed steps run in graphs wherever they run: hybrid, and rapid's decode worker when the adaptive placement
    may put prompts there; the prefill workers always."""
    from rapid.config import RapidConfig
    from rapid.worker.model_setup import runs_prefill_graphs

    adaptive = EngineConfig(model="m", tokenizer=None, mode="rapid")
    static = EngineConfig(model="m", tokenizer=None, mode="rapid", rapid=RapidConfig(placement="static"))
    assert runs_prefill_graphs("decode", adaptive) and not runs_prefill_graphs("decode", static)
    assert all(runs_prefill_graphs(r, static) for r in ("prefill", "prefill2"))
    assert runs_prefill_graphs("hybrid", EngineConfig(model="m", tokenizer=None, mode="hybrid"))


@pytest.fixture(scope="module")
def cpu_model(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), tokenizer=None, device="cpu",
                          scheduler=SchedulerConfig(max_model_len=64))
    model, _ = load_model(config, torch.device("cpu"))
    return model


def test_profile_on_cpu_returns_zeros(cpu_model):
    cpu = torch.device("cpu")
    assert profile_forward_memory(cpu_model, cpu, 256, 8, 64, 16) == ForwardPeaks(0, 0)
    assert non_torch_bytes(cpu) == 0 and memory.max_reserved_bytes(cpu) == 0


def test_prefill_lens_never_exceed_max_model_len():
    assert prefill_lens(8192, 4096) == [4096, 4096]
    assert prefill_lens(158, 64) == [64, 64, 30]
    assert prefill_lens(100, 4096) == [100]


@pytest.mark.parametrize("lens,num_decodes,max_seq_len", [([64, 64, 30], 0, 64), ([1] * 8, 8, 64), ([1], 0, 1)])
def test_profile_step_writes_nothing_to_the_kv_pool(cpu_model, lens, num_decodes, max_seq_len):
    """The profiled shapes (prefill chunks of at most max_model_len; decode rows read at the length
    bound) run over the scratch pool and leave it untouched."""
    kv = scratch_kv_pool(cpu_model, block_size=16)
    assert kv.shape == (2, 2, 2, 16, 2, 16)  # [L, 2, 2 blocks, BS, KVH, D]
    kv.fill_(0.25)
    run_profile_step(cpu_model, kv, lens, num_decodes, max_seq_len, num_sample_rows=8)
    assert torch.all(kv == 0.25)


def test_check_process_memory_warns_naming_the_process(caplog):
    with caplog.at_level(logging.WARNING, logger="rapid.worker.memory"):
        assert check_process_memory("decode process (pid 12)", 3 * GiB, 2 * GiB) is False
        assert check_process_memory("prefill process (pid 13)", GiB, 2 * GiB) is True
        assert check_process_memory("core process (pid 14)", GiB, 0) is True  # no plan: nothing to check
    assert "decode process (pid 12)" in caplog.text and "3.00 GiB" in caplog.text and "2.00 GiB" in caplog.text
    assert "pid 13" not in caplog.text and "pid 14" not in caplog.text


def test_worker_ready_memory_fields_are_optional():
    old = msgspec.msgpack.encode(WorkerReady("core", 1))
    got = msgspec.msgpack.decode(old, type=WorkerReady)
    assert got.max_reserved_bytes == 0 and got.allowed_bytes == {}
    ready = WorkerReady("decode", 2, max_reserved_bytes=5 * GiB, allowed_bytes={"decode": 6 * GiB, "prefill": GiB})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ready), type=WorkerReady) == ready

"""GPU path of mode 'rapid' (skipped without CUDA): CUDA IPC arena, hand-off synchronisation, MPS,
greedy equality with transformers in hybrid and rapid modes."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest
import torch

from rapid import LLM, SamplingParams
from rapid.engine import reaper
from tiny import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WRITER = textwrap.dedent("""
    import sys, msgspec, torch
    from rapid.worker.arena import ArenaHandle, SharedArena
    from rapid.worker.process import sync_device as _sync
    handle = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ArenaHandle)
    dev = torch.device("cuda", 0)
    arena = SharedArena.open(handle, dev)
    x = arena.buffer[: 1 << 20].view(torch.float32)
    import time
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    torch.mm(a, a)
    x[:1].zero_()                # the first kernel that touches a fresh IPC mapping waits for all earlier work
    torch.cuda.synchronize()     # (measured on the H100: bench/probe_handoff.py); cuBLAS set up here too
    t0 = time.perf_counter()
    for _ in range(int(sys.argv[2])):            # about 1.5 ms of matmul each, queued before the write
        torch.mm(a, a)
    x.fill_(7.0)                                 # the KV write the reader must not miss
    if sys.argv[1] == "sync":
        _sync(dev)                               # what the prefill worker does before PrefillDone
    complete = torch.cuda.current_stream(dev).query()  # are the writes finished at hand-off time?
    print("done", int(complete), f"{1e3 * (time.perf_counter() - t0):.1f}", flush=True)  # the hand-off message
    sys.stdin.close()
    import time; time.sleep(3)                   # stay alive (the importer must not vanish mid-read)
""")


def _handoff(sync: bool) -> tuple[bool, float, str]:
    from rapid.worker.arena import SharedArena

    dev = torch.device("cuda", 0)
    arena = SharedArena.create(1 << 22, dev)
    x = arena.buffer[: 1 << 20].view(torch.float32)
    x.zero_()
    torch.cuda.synchronize()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "sync" if sync else "nosync", "300"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    proc.stdin.write(msgspec.msgpack.encode(arena.handle))
    proc.stdin.close()
    line = proc.stdout.readline().split()
    if not line or line[0] != b"done":
        proc.wait(timeout=30)
        raise AssertionError(f"writer exited with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
    seen = x[-1].item()  # what the decode side reads right after the hand-off message
    proc.wait(timeout=30)
    arena.close()
    return bool(int(line[1])), seen, f"writer's time to the message: {line[2].decode()} ms"


def test_handoff_sync_makes_delayed_writes_visible():
    complete, seen, timing = _handoff(sync=True)
    assert complete and seen == 7.0, timing


def test_handoff_without_sync_reads_stale_kv():
    # Control: without the synchronisation the hand-off message goes out while the delayed KV write is
    # still queued, and the reader (another process, as the decode worker is) reads the stale value:
    # the test above fails when the sync is removed.
    complete, seen, timing = _handoff(sync=False)
    assert not complete and seen == 0.0, (complete, seen, timing)


def test_expandable_segments_refused(tiny_llama, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(ValueError, match="expandable_segments"):
        LLM(tiny_llama, mode="rapid")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 17, 64, 150)]


@pytest.mark.parametrize("mode,prefill_attention", [("hybrid", "flash"), ("rapid", "flash"), ("hybrid", "paged"),
                                                     ("rapid", "paged")])
def test_gpu_greedy_equals_transformers(tiny_llama, prompts, mode, prefill_attention):
    """paged: the Triton paged prefill kernel, so hybrid's prefill and mixed batches (and the rapid prefill
    worker's batches) run as whole CUDA graphs."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_llama, mode=mode, dtype="float32", max_num_batched_tokens=64, max_num_seqs=8,
             gpu_memory_utilization=0.3, prefill_attention=prefill_attention) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        if mode == "hybrid" and prefill_attention == "paged":  # the whole graphs really ran the prefill batches
            from rapid.compile.full_graph import FullGraphRunner

            runners = llm.engine.core.workers.loop.runner.graph_runners
            replays = [r.num_replays for r in runners if isinstance(r, FullGraphRunner)]
            del runners  # a reference kept past shutdown would keep the KV pool on the GPU for the next test
            assert len(replays) == 1 and replays[0] > 0
        stats = llm.engine.get_stats()
        if mode == "rapid":
            assert stats.num_free_blocks == stats.num_blocks
        # CUDA events timed every worker's steps: busy time on the device, and at least one step per prompt
        lanes = {"decode", "mixed", "inline"} if mode == "hybrid" else {"decode", "prefill", "mixed", "inline"}
        assert set(stats.device_time) <= lanes and stats.device_time["decode"][0] >= 15
        assert sum(t[0] for k, t in stats.device_time.items() if k != "decode") >= 1
        assert all(busy > 0 and idle >= 0 for _, busy, idle in stats.device_time.values())
        # every step ran in a captured graph, rapid's decode worker's mixed and prompt-only steps included
        assert stats.eager_steps == {}
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(tiny_llama, p, 16) for p in prompts]


@pytest.mark.parametrize("mode,prefill_attention", [("hybrid", "paged"), ("hybrid", "flash"), ("rapid", "paged")])
def test_gpu_float8_kv_greedy_equals_transformers_reading_float8(tiny_llama, prompts, mode, prefill_attention):
    """kv_cache_dtype fp8 on the GPU, graphs captured over the float8 pool: greedy equals transformers whose
    attention reads keys and values rounded to float8 e4m3 (tiny.hf_greedy's kv_dtype)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_llama, mode=mode, dtype="float32", kv_cache_dtype="fp8", max_num_batched_tokens=64, max_num_seqs=8,
             gpu_memory_utilization=0.3, prefill_attention=prefill_attention) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.get_stats().eager_steps == {}
    expected = [hf_greedy(tiny_llama, p, 16, kv_dtype=torch.float8_e4m3fn) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected


def _mps_servers() -> int:
    out = subprocess.run(["pgrep", "-f", "nvidia-cuda-mps"], capture_output=True, text=True).stdout.split()
    return len(out)


def test_rapid_starts_checks_and_stops_its_own_mps_daemon(tiny_llama):
    if subprocess.run(["which", "nvidia-cuda-mps-control"], capture_output=True).returncode != 0:
        pytest.skip("no nvidia-cuda-mps-control")
    before = _mps_servers()
    with LLM(tiny_llama, mode="rapid", dtype="bfloat16", prefill_sm_percentage=60, decode_sm_percentage=40,
             gpu_memory_utilization=0.3) as llm:
        mps = llm.engine.mps
        assert mps is not None and (mps.started or before > 0)
        recorded = Path(llm.engine.dir) / reaper.MPS_FILE  # what the reaper stops should this process be killed
        assert recorded.read_text().split()[0] == mps.pipe_dir if mps.started else not recorded.exists()
        out = llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4
    deadline = time.monotonic() + 10.0  # the daemon and its server exit after 'quit' (the engine waits for them)
    while _mps_servers() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _mps_servers() <= before
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ or before > 0

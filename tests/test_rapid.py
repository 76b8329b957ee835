"""Mode 'rapid' on the CPU: the real multi-process pipeline (core + prefill worker + decode worker)."""

import contextlib
import os
import random
import signal
import threading
import time

import msgspec
import psutil
import pytest
import zmq

from rapid import LLM, SamplingParams
from rapid.protocol.engine import AddRequest
from rapid.protocol.worker import SeqWork
from rapid.engine.client import EngineDeadError
from tiny import children, engine_pids, gone, hf_greedy, shm_of

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(seed=0, lengths=(1, 5, 17, 33, 64, 90)):
    rng = random.Random(seed)
    return [[rng.randrange(5, 300) for _ in range(n)] for n in lengths]


def run(llm, ps, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)]


@pytest.fixture(scope="module")
def rapid_llm(tiny_llama):
    with LLM(tiny_llama, mode="rapid", max_num_batched_tokens=32) as llm:
        yield llm


def test_rapid_equals_hybrid_and_transformers(tiny_llama, rapid_llm):
    ps = prompts()
    got = run(rapid_llm, ps)
    with LLM(tiny_llama, max_num_batched_tokens=32) as hybrid:
        assert run(hybrid, ps) == got
    assert got == [hf_greedy(tiny_llama, p, GREEDY.max_tokens) for p in ps]
    # the adaptive placement (mode rapid's default) used both lanes: the first prompts inside the idle decode
    # executor's steps, the rest on the prefill worker beside the decodes
    stats = rapid_llm.engine.get_stats()
    assert stats.placement_policy == "adaptive" and min(stats.prefill_tokens_by_lane.values()) > 0, stats
    learned = stats.placement_learned  # what it decided by, as measured in this run
    assert learned["decode_alone_ms"] > 0 and learned["prefill_tok_s:prefill"] > 0, learned


def test_placement_mixed_runs_every_prompt_in_the_decode_workers_steps(tiny_llama):
    """Placement 'mixed' is hybrid batching in rapid's processes (the baseline that prices the layout): every
    prompt token runs in the decode worker's steps, and greedy tokens equal transformers'."""
    ps = prompts()
    with LLM(tiny_llama, mode="rapid", placement="mixed", max_num_batched_tokens=32) as llm:
        got = run(llm, ps)
        stats = llm.engine.get_stats()
    assert got == [hf_greedy(tiny_llama, p, GREEDY.max_tokens) for p in ps]
    assert stats.placement_policy == "static decode"
    assert stats.prefill_tokens_by_lane.get("prefill", 0) == 0 and stats.prefill_tokens_by_lane["decode"] > 0, stats


def test_rapid_sampling_seeded_equals_hybrid(tiny_llama, rapid_llm):
    params = SamplingParams(temperature=0.9, top_k=50, seed=11, max_tokens=10, ignore_eos=True)
    ps = prompts(seed=3, lengths=(4, 40))
    with LLM(tiny_llama) as hybrid:
        assert run(rapid_llm, ps, params) == run(hybrid, ps, params)


def test_rapid_stop_strings_logprobs_and_streaming(tiny_llama, rapid_llm):
    with LLM(tiny_llama) as hybrid:
        ref = hybrid.generate("Paris is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
                              use_tqdm=False)[0].outputs[0]
    out = rapid_llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
                             use_tqdm=False)[0].outputs[0]
    assert out.text == ref.text and out.token_ids == ref.token_ids
    assert [set(lp) for lp in out.logprobs] == [set(lp) for lp in ref.logprobs]
    stop = ref.text[4:7]
    cut = rapid_llm.generate("Paris is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                             use_tqdm=False)[0].outputs[0]
    assert cut.text == ref.text[: ref.text.index(stop)] and cut.finish_reason == "stop"
    deltas = list(rapid_llm.generate_stream("Paris is", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)))
    assert len(deltas) > 3 and "".join(d.new_text for d in deltas) == ref.text
    stats = rapid_llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0


def test_prefill_and_decode_really_overlap(rapid_llm):
    client = rapid_llm.engine
    before = client.get_stats()
    n_prefill, n_decode = len(before.prefill_intervals), len(before.decode_intervals)
    # One request decodes for a long time while long prompts prefill in 32-token chunks beside it.
    rng = random.Random(1)
    long_prompts = [[rng.randrange(5, 300) for _ in range(400)] for _ in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)] + [SamplingParams(max_tokens=2)] * 3
    rapid_llm.generate([{"prompt_token_ids": [7, 8, 9]}] + [{"prompt_token_ids": p} for p in long_prompts],
                       params, use_tqdm=False)
    stats = client.get_stats()
    prefill = stats.prefill_intervals[n_prefill:]
    decode = stats.decode_intervals[n_decode:]
    overlapping = [(p, d) for p in prefill for d in decode if d[0] < p[1] and p[0] < d[1]]
    assert len(prefill) >= 30 and len(decode) >= 140
    assert len(overlapping) >= 10, f"prefill and decode did not run at the same time: {len(overlapping)} overlaps"
    assert stats.handoff_s and stats.decode_idle_gaps_s
    # the prefill worker's host time per batch and its wait between batches, one entry per prefill interval
    from rapid.bench.frontier import prefill_worker_times

    assert len(stats.prefill_host_s) == len(stats.prefill_idle_gaps_s) == len(stats.prefill_intervals)
    t0, t1 = prefill[0][0], prefill[-1][1]
    times = prefill_worker_times(stats, t0, t1)
    host = [h for h, (a, _) in zip(stats.prefill_host_s, stats.prefill_intervals) if a >= t0 and h > 0]
    assert host and all(h <= b - a for h, (a, b) in zip(stats.prefill_host_s, stats.prefill_intervals))
    assert times["prefill_host_median_ms"] > 0 and times["prefill_idle_gap_median_ms"] >= 0
    # device time by step kind since start: each worker's steps, busy and idle (host-clock events on the CPU)
    steps = {kind: total[0] - before.device_time.get(kind, [0])[0] for kind, total in stats.device_time.items()}
    on_worker = [(a, b) for h, (a, b) in zip(stats.prefill_host_s[-len(prefill):], prefill) if h > 0]
    assert steps["prefill"] == len(on_worker) >= 1  # the rest ran inline, in the decode worker's steps
    assert steps["decode"] + steps.get("mixed", 0) == len(decode)
    busy = stats.device_time["prefill"][1] - before.device_time.get("prefill", [0, 0.0])[1]
    assert 0 < busy <= sum(b - a for a, b in on_worker)


def test_malformed_bytes_on_every_socket_crash_nothing(rapid_llm):
    client = rapid_llm.engine
    ctx = zmq.Context()
    valid = msgspec.msgpack.encode(AddRequest("x", [1, 2, 3], SamplingParams()))
    payloads = [b"", b"\x00", os.urandom(64), b"\xc1" * 10, valid[: len(valid) // 2],
                msgspec.msgpack.encode({"type": "Unknown"}), msgspec.msgpack.encode(SeqWork("y", [1], 0, [0], True))]
    try:
        for name in ("core_in", "worker_out", "prefill_in", "decode_in", "core_out", "ready"):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(client.endpoints[name])
            for p in payloads:
                sock.send(p)
            time.sleep(0.1)
            sock.close()
    finally:
        ctx.term()
    time.sleep(0.3)
    assert all(c.alive() for c in client.children)
    assert len(run(rapid_llm, prompts(lengths=(5, 20)))[1]) == 12


def test_startup_record_of_every_process(rapid_llm):
    """The supervisor keeps each ready handshake; on the CPU there is no GPU peak and no memory plan."""
    started = rapid_llm.engine.started
    assert set(started) == {"decode", "prefill", "core"}
    assert all(r.max_reserved_bytes == 0 and r.allowed_bytes == {} for r in started.values())
    assert started["decode"].num_blocks == rapid_llm.engine.num_blocks


def test_engine_clients_fit_the_truncated_prompt(tiny_llama, rapid_llm):
    """An engine request whose prompt is past max_model_len but truncate_prompt_tokens cuts it to fit: both engine
    clients run the truncated prompt (the multi-process one refused it, checking the whole prompt's length)."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=8)
    prompt = [5 + i % 200 for i in range(rapid_llm.config.scheduler.max_model_len + 10)]
    expected = hf_greedy(tiny_llama, prompt[-8:], 4)
    for llm in (rapid_llm, LLM(tiny_llama)):
        with llm if llm is not rapid_llm else contextlib.nullcontext():
            llm.engine.add_request(AddRequest("long", prompt, params, arrival_time=time.time()))
            deltas, deadline = [], time.time() + 30
            while not (deltas and deltas[-1].finished) and time.time() < deadline:
                deltas += [d for d in llm.engine.get_deltas(timeout_s=0.5) if d.request_id == "long"]
            assert [t for d in deltas for t in d.new_token_ids] == expected and deltas[-1].error is None


def test_abort_through_the_pipeline_frees_every_block(rapid_llm):
    client = rapid_llm.engine
    stats = client.get_stats()
    ids = [f"abort-{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        client.add_request(AddRequest(rid, list(range(5, 5 + 30 * (i + 1))),
                                      SamplingParams(max_tokens=300, ignore_eos=True), arrival_time=time.time()))
    time.sleep(0.3)  # some are decoding, some prefilling or queued
    client.abort(ids)
    finished = set()
    deadline = time.time() + 20
    while finished != set(ids) and time.time() < deadline:
        finished |= {d.request_id for d in client.get_deltas(timeout_s=0.5) if d.finished}
    assert finished == set(ids)
    for _ in range(50):
        stats = client.get_stats()
        if stats.num_free_blocks == stats.num_blocks:
            break
        time.sleep(0.1)
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0


@pytest.mark.parametrize("victim", ["prefill", "decode", "core"])
def test_killed_process_ends_requests_with_an_error_and_leaves_nothing(tiny_llama, victim):
    others = {p.pid for p in children()}
    llm = LLM(tiny_llama, mode="rapid", max_num_batched_tokens=16)
    client = llm.engine
    sock_dir, shm_names = client.dir, list(client.shm_names)
    pids = engine_pids(llm)
    timer = threading.Timer(0.5, os.kill, (pids[victim], signal.SIGKILL))
    timer.start()
    t0 = time.time()
    with pytest.raises(EngineDeadError, match=rf"{victim} process \(pid {pids[victim]}\) died with exit code -9"):
        llm.generate([{"prompt_token_ids": list(range(5 + i, 105 + i))} for i in range(32)],
                     SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
    assert time.time() - t0 < 0.5 + 5.0  # noticed within 5 seconds
    timer.join()
    # every process of that incarnation is gone, and its arena, before anything new starts
    assert all(gone(pid) for pid in pids.values())
    assert {p.pid for p in children(others)} == {client.reaper.pid}  # it lives as long as the engine
    assert shm_names and not shm_of(pids.values(), shm_names)
    # then the engine restarts its processes (test_reliability.py has the details) and serves again
    assert len(llm.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
               .outputs[0].token_ids) == 3
    new_pids = engine_pids(llm)
    llm.shutdown()
    assert all(gone(pid) for pid in new_pids.values())
    assert not children(others)
    assert not os.path.exists(sock_dir)


def test_start_timeout_names_the_process(tiny_llama):
    others = {p.pid for p in children()}
    with pytest.raises(TimeoutError, match=r"decode process \(pid \d+\) was not ready within"):
        LLM(tiny_llama, mode="rapid", worker_start_timeout_s=0.05)
    assert not children(others)


def test_engines_leak_nothing_however_they_end(tiny_llama):
    """Each way an engine can end (shutdown twice, a with block, garbage collection, shutdown while requests run)
    leaves no process, /dev/shm segment, socket dir, file descriptor or thread. A leak shows after one engine:
    the first (a warm-up for lazily opened files and imports) sets the counts, then each way runs once."""
    proc = psutil.Process()
    others = {p.pid for p in children()}
    engines = []  # (pids, shm names, socket dir) of each engine, taken while it runs

    def cycle(end):
        llm = LLM(tiny_llama, mode="rapid")
        engines.append((list(engine_pids(llm).values()), list(llm.engine.shm_names), llm.engine.dir))
        assert len(run(llm, [[5, 6, 7]], SamplingParams(max_tokens=2))[0]) == 2
        if end == "shutdown":
            llm.shutdown()
            llm.shutdown()  # idempotent
        elif end == "with":
            with llm:
                pass
        elif end == "busy":
            client = llm.engine
            for i in range(4):
                client.add_request(AddRequest(f"busy-{i}", list(range(5, 45 + i)),
                                              SamplingParams(max_tokens=300, ignore_eos=True), arrival_time=time.time()))
            deadline = time.monotonic() + 20
            while not any(d.new_token_ids for d in client.get_deltas(timeout_s=0.5)):
                assert time.monotonic() < deadline, "no request started decoding"
            llm.shutdown()
        else:
            del llm  # garbage collection runs the finalizer

    cycle("shutdown")  # warm up imports and lazily opened files
    fds, threads = proc.num_fds(), proc.num_threads()
    for end in ("with", "gc", "busy", "shutdown"):
        cycle(end)
    import gc

    gc.collect()
    assert not children(others)
    for pids, shm_names, sock_dir in engines:
        assert all(gone(pid) for pid in pids)
        assert shm_names and not shm_of(pids, shm_names)
        assert not os.path.exists(sock_dir)
    assert proc.num_fds() <= fds
    assert proc.num_threads() <= threads


def test_interpreter_exit_without_shutdown_leaves_nothing(tiny_llama, tmp_path):
    """A script that creates a rapid engine and just exits: the finalizer cleans up at interpreter exit."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from rapid import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_llama)!r}, mode='rapid')\n"
        "c = llm.engine\n"
        "print(c.dir, *[ch.process.pid for ch in c.children], *c.shm_names, flush=True)\n"
        "llm.generate('hello', SamplingParams(max_tokens=2), use_tqdm=False)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sock_dir, *rest = out.stdout.split()
    pids = [int(x) for x in rest if x.isdigit()]
    shm_names = [x for x in rest if not x.isdigit()]
    assert len(pids) == 3 and shm_names
    assert not os.path.exists(sock_dir)
    assert all(gone(p) for p in pids)
    assert not shm_of(pids, shm_names)


def test_zmq_server_over_a_rapid_engine(rapid_llm):
    from rapid.client import Client
    from rapid.server import RapidServer

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = rapid_llm.generate("Paris is", params, use_tqdm=False)[0].outputs[0]
    with RapidServer(rapid_llm).start() as server, Client(server.address) as client:
        done = client.generate("Paris is", params)
        streamed = list(client.stream("Paris is", params))
    assert done.token_ids == expected.token_ids and done.text == expected.text
    assert "".join(d.new_text for d in streamed) == expected.text

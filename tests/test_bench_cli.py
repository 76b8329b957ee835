"""Benchmarks as a user runs them, as short CPU smokes: bench offline, bench serve (two modes in process, and an
OpenAI-compatible server faked in the test), bench frontier."""

import json
import shlex
import sys

import pytest

from rapid.entrypoints.cli import main

pytestmark = pytest.mark.slow


def test_bench_offline_smoke(tiny_llama, tmp_path):
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", "--model", str(tiny_llama), "--num-seqs", "4", "--min-input-len", "8",
                 "--max-input-len", "32", "--min-output-len", "4", "--max-output-len", "8",
                 "--prefill-attention", "cudnn", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["args"]["prefill_attention"] == "cudnn"  # accepted (the CPU's reference backend ignores it)
    # the command as typed, which pastes and runs again from cwd, and the code that ran
    assert result["command"].startswith("rapid bench offline --model ") and "--prefill-attention cudnn" in result["command"]
    assert {"rapid", "python", "torch"} <= set(result["versions"]) and result["cwd"]
    assert main(shlex.split(result["command"])[1:]) == 0  # it ran again (the saved command used to be refused)
    assert result["num_seqs"] == 4 and result["output_tokens"] >= 16 and result["output_throughput_tok_s"] > 0
    # where the run's time went on the device, by step kind: the warm-up request's steps are not counted
    device = result["engine"]["device_time"]
    assert "decode" in device and sum(t["steps"] for t in device.values()) >= 4  # 4 or more output tokens each
    assert sum(t["busy_s"] for t in device.values()) <= result["elapsed_s"]
    # where the decode stream waited: every decode and mixed step of the run, by the kinds before and after
    idle = result["engine"]["decode_idle"]
    assert idle["steps"] == sum(t["steps"] for k, t in device.items() if k in ("decode", "mixed"))
    assert sum(v["steps"] for v in idle["by_transition"].values()) == idle["steps"]
    assert abs(idle["idle_s"] - sum(t["idle_s"] for k, t in device.items() if k in ("decode", "mixed"))) < 1e-3
    assert idle["longest"] and all(w["kind"] in ("decode", "mixed") for w in idle["longest"])
    assert result["engine"]["prefill_worker"] is None  # hybrid: no prefill worker
    # the run's prompt tokens, all in hybrid's steps: the warm-up's are left out (64 more before)
    assert result["engine"]["prefill_tokens_by_lane"] == {"decode": result["input_tokens"], "prefill": 0}
    assert result["engine"]["eager_steps"] == {}  # no graphs on the CPU, so none fell back


@pytest.mark.parametrize("flags, message", [
    (["--num-seqs", "0"], "--num-seqs (--num-prompts) must be >= 1, got 0"),
    (["--min-input-len", "10", "--max-input-len", "5"], "got 10 and 5"),
    (["--min-output-len", "0"], "--min-output-len and --max-output-len must satisfy"),
    (["--num-prompts", "0"], "--num-seqs (--num-prompts) must be >= 1, got 0"),
    (["--input-len", "0"], "--min-input-len and --max-input-len must satisfy"),
])
def test_bench_offline_refuses_bad_lengths_before_loading(tmp_path, capsys, flags, message):
    assert main(["bench", "offline", "--model", str(tmp_path / "absent"), *flags]) == 2  # no model is read
    assert message in capsys.readouterr().err


def test_bench_commands_take_vllms_flag_names():
    """`vllm bench throughput`'s --num-prompts / --input-len / --output-len and `vllm bench serve`'s --request-rate
    name the same settings as rapid's own flags."""
    from rapid.entrypoints.cli import build_parser

    parse = build_parser().parse_args
    a = parse(["bench", "offline", "--num-prompts", "7", "--input-len", "50", "--output-len", "20"])
    assert (a.num_seqs, a.min_input_len, a.max_input_len, a.min_output_len, a.max_output_len) == (7, 50, 50, 20, 20)
    assert not hasattr(a, "input") and not hasattr(a, "output")
    b = parse(["bench", "offline"])
    assert (b.num_seqs, b.min_input_len, b.max_input_len) == (256, 100, 1024)
    assert parse(["bench", "serve", "--request-rate", "5"]).request_rates == "5"


def test_prefill_worker_summary_takes_the_runs_worker_batches():
    """The prefill workers' batches of the run: the latest that many entries with host time (a mixed step's prompt
    part reports 0), medians in ms, and device time from the run's counters."""
    from types import SimpleNamespace

    from rapid.bench.offline import prefill_worker_during

    stats = SimpleNamespace(prefill_intervals=[(float(i), i + 0.5) for i in range(5)],
                            prefill_host_s=[0.9, 0.001, 0.0, 0.002, 0.003],  # the first: a batch before the run
                            prefill_idle_gaps_s=[0.5, 0.010, 0.0, 0.020, 0.030], prefill_tokens=[7, 100, 16, 300, 200])
    device = {"decode": {"steps": 9, "busy_s": 1.0, "idle_s": 0.0}, "prefill": {"steps": 3, "busy_s": 0.3, "idle_s": 0.1}}
    got = prefill_worker_during(device, stats)
    assert got == {"batches": 3, "tokens_median": 200, "host_ms_median": 2.0, "host_ms_p90": 3.0,
                   "wait_ms_median": 20.0, "wait_ms_p90": 30.0, "device_ms_mean": 100.0}
    assert prefill_worker_during({"decode": device["decode"]}, stats) is None
    short = prefill_worker_during({"prefill": {"steps": 9, "busy_s": 0.9, "idle_s": 0.0}}, stats)
    assert short == {"batches": 9, "recorded": "not recorded: the engine's stats keep 4 of 9 batches"}


def test_decode_idle_groups_waits_by_transition():
    """The same steps through the engine's stats and decode_idle_during: waits by the kinds before and waiting, the
    ones over 1 ms, and the longest from the per-step series (the first step followed nothing resident)."""
    from rapid.bench.offline import decode_idle_during
    from rapid.engine.core import StepStats
    from rapid.protocol.worker import DecodeStep, DeviceTime

    stats = StepStats()
    for kind, idle, rows, after_idle in [("mixed", 0.0, 2, True), ("decode", 0.004, 3, False),
                                         ("decode", 0.0001, 3, False), ("mixed", 0.002, 4, False)]:
        stats.record(DecodeStep([None] * rows, [], 0.0, 1.0, device=DeviceTime(kind, 0.01, idle),
                                after_idle=after_idle))
    d = decode_idle_during({"decode": {"steps": 2}, "mixed": {"steps": 2}}, stats.snapshot(), {})
    assert d["by_transition"]["mixed -> decode"] == {"steps": 1, "idle_s": 0.004}
    assert d["by_transition"]["decode -> decode"]["steps"] == 1 and d["by_transition"]["idle -> mixed"]["steps"] == 1
    assert d["steps_over_1ms"] == 2 and abs(d["idle_s_over_1ms"] - 0.006) < 1e-9
    assert d["longest"][0] == {"step": 1, "after": "mixed", "kind": "decode", "idle_ms": 4.0, "batch": 3}


def test_decode_idle_totals_cover_runs_longer_than_the_stats_window():
    """The engine counts the decode stream's waits by transition since start (a step after the executor had nothing
    resident under "idle -> ...", apart from the waits), so a run of any length is profiled from two snapshots; the
    longest waits need the per-step series to cover the run."""
    from types import SimpleNamespace

    from rapid.bench.offline import decode_idle_during
    from rapid.engine.core import StepStats
    from rapid.protocol.worker import DecodeStep, DeviceTime, PrefillDone

    stats = StepStats()

    def step(kind, idle_s, after_idle=False):
        stats.record(DecodeStep([], [], 0.0, 1.0, idle_gap_s=0.001, device=DeviceTime(kind, 0.01, idle_s),
                                after_idle=after_idle))

    step("decode", 2.0, after_idle=True)  # the first step: nothing was resident before it
    before = stats.snapshot().decode_idle_totals
    step("mixed", 0.0001)
    step("decode", 0.003)
    stats.record(PrefillDone(1, [], 0.0, 1.0, device=DeviceTime("inline", 0.01, 5.0)))  # prompt-only, after a spell
    step("decode", 0.0002)  # after the inline step: not after "decode"
    step("decode", 5.0, after_idle=True)
    after = stats.snapshot()
    assert after.decode_idle_totals["idle -> decode"] == [2, 7.0, 2, 7.0]
    device_time = {"decode": {"steps": 3}, "mixed": {"steps": 1}}
    d = decode_idle_during(device_time, after, before)
    assert d["by_transition"] == {"idle -> decode": {"steps": 1, "idle_s": 5.0},
                                  "mixed -> decode": {"steps": 1, "idle_s": 0.003},
                                  "inline -> decode": {"steps": 1, "idle_s": 0.0002},
                                  "decode -> mixed": {"steps": 1, "idle_s": 0.0001}}
    assert d["steps"] == 4 and d["steps_over_1ms"] == 1 and d["idle_s_without_work"] == 5.0
    assert abs(d["idle_s"] - 0.0033) < 1e-9
    assert d["longest"][0]["idle_ms"] == 3.0  # the waits only: the dry spell is not one
    short_window = SimpleNamespace(decode_device_idle=after.decode_device_idle[-2:],
                                   decode_idle_totals=after.decode_idle_totals)
    d = decode_idle_during(device_time, short_window, before)  # 4 steps ran, 2 kept: no longest, totals still
    assert "longest" not in d and d["steps"] == 4 and d["idle_s_over_1ms"] == 0.003
    restarted = decode_idle_during(device_time, after, {})  # the caller saw a restart: the new incarnation's totals
    assert restarted["steps"] == 5 and restarted["by_transition"]["idle -> decode"]["steps"] == 2  # the first too


def test_bench_serve_steady_state_two_modes_smoke(tiny_llama, tmp_path):
    assert main(["bench", "serve", "--model", str(tiny_llama), "--modes", "hybrid,rapid:static", "--duration-s", "3",
                 "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "6",
                 "--request-rates", "3,6", "--ignore-eos", "--goodput", "ttft:5000", "tpot:1000",
                 "--max-model-len", "256", "--result-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "serve.json").read_text())
    method = summary["method"]
    assert summary["args"]["engine_process"] is True  # hybrid's core in a child process, as rapid serve runs it
    assert summary["command"].startswith("rapid bench serve --model ") and "versions" in summary
    assert method["num_prompts"] == {"3": 9, "6": 18} and method["duration_s"] == {"3": 3.0, "6": 3.0}
    assert method["warmup_s"] == {"3": 0.75, "6": 0.75} and method["seeds"] == {"3": 0, "6": 1}
    assert method["shared_first_blocks"] == 0 and "unstable" in method["stability_rule"]
    for mode in ("hybrid", "rapid:static"):
        entry = summary["modes"][mode]
        for r in entry["per_rate"]:
            arrivals = [rec[5] for rec in r["records"]]
            assert r["excluded_warmup"] == sum(a < 0.75 for a in arrivals)
            assert r["completed"] + r["failed"] == len(r["records"]) - r["excluded_warmup"]
            assert r["failed"] == 0 and r["median_ttft_ms"] > 0 and r["stability"]["stable"] in (True, False, None)
            assert r["served_rate"] == r["request_throughput"] and r["output_throughput"] > 0
            # where this rate's prompts ran: every prompt token of its requests, on the lane of the placement
            lanes, policy = r["engine"]["prefill_tokens_by_lane"], r["engine"]["placement_policy"]
            lane = "decode" if mode == "hybrid" else "prefill"
            assert policy == ("static decode" if mode == "hybrid" else "static prefill") and r["engine"]["preemptions"] == 0
            assert lanes[lane] >= 32 * len(r["records"]) and sum(lanes.values()) == lanes[lane]
            assert r["engine"]["placement_learned"] == {}  # a static placement measures nothing
            batches_on_lane = r["engine"]["prefill_batches_by_lane"][lane]
            assert batches_on_lane > 0 and r["engine"]["prefill_batches_by_reason"] == {f"{lane}: static": batches_on_lane}
            # each worker stream's time during this rate: hybrid decodes on one, rapid also prefills on another
            device = r["engine"]["device_time"]
            assert device["decode"]["steps"] >= 5 and ("prefill" in device) == (mode != "hybrid")
            idle = r["engine"]["decode_idle"]  # where the decode stream waited during this rate, step by step
            assert idle["steps"] == sum(t["steps"] for k, t in device.items() if k in ("decode", "mixed"))
            batches = r["engine"]["prefill_worker"]  # rapid's prefill worker, per batch of this rate
            if mode == "hybrid":
                assert batches is None
            else:
                assert batches["batches"] == device["prefill"]["steps"] and batches["host_ms_median"] > 0
                assert batches["tokens_median"] >= 32 and batches["device_ms_mean"] > 0
        assert "saturation" in entry and "goodput_by_slo" in entry
    md = (tmp_path / "serve.md").read_text()
    assert "## hybrid" in md and "## rapid" in md and "saturation" in md and "placement (static prefill)" in md
    assert "## hybrid (1 CPU)" in md and "GPU" not in md  # a CPU run is counted per CPU, not per GPU
    assert "decode worker's device stream busy" in md and "decode stream's waits for the host" in md
    assert "prefill workers per batch" in md
    assert (tmp_path / "attainment.png").stat().st_size > 0


def _fake_openai_server(seen: list):
    """An OpenAI-style streaming /v1/completions: one SSE chunk per token (20 ms to the first, 5 ms apart), a
    finish-reason chunk, a usage chunk, [DONE]."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if not isinstance(body["prompt"], list):
            return JSONResponse({"error": "token ids expected"}, status_code=400)
        n = body["max_tokens"]

        async def stream():
            await asyncio.sleep(0.02)
            for i in range(n):
                if i:
                    await asyncio.sleep(0.005)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x', 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def test_bench_serve_openai_backend_against_a_fake_server(tmp_path, monkeypatch, capsys):
    import threading
    import time

    import uvicorn

    seen: list = []
    server = uvicorn.Server(uvicorn.Config(_fake_openai_server(seen), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # and the README's first install: no matplotlib
    try:
        assert main(["bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
                     "--vocab-size", "320", "--modes", "rapid", "--duration-s", "2", "--warmup-s", "0.5",
                     "--request-rates", "5,10", "--dataset-name", "random", "--random-input-len", "24",
                     "--random-output-len", "6", "--ignore-eos", "--result-dir", str(tmp_path)]) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert "plots skipped: matplotlib is not installed (pip install -e '.[bench]')" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "serve.md").is_file()
    assert len(seen) == 4 + 10 + 20  # warm-up, then rate x duration at each rate
    body = seen[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["max_tokens"] == 6 and len(body["prompt"]) == 24 and all(isinstance(t, int) for t in body["prompt"])
    summary = json.loads((tmp_path / "serve.json").read_text())
    assert summary["device"].startswith("OpenAI-compatible server") and summary["method"]["backend"] == "openai"
    for r in summary["modes"]["rapid"]["per_rate"]:
        assert r["failed"] == 0 and r["completed"] > 0
        assert all(rec[1] == 6 for rec in r["records"])  # completion_tokens of the usage chunk
        assert 20 <= r["median_ttft_ms"] < 1000 and 4 <= r["median_itl_ms"] < 200 and r["median_tpot_ms"] >= 4
        assert r["stability"]["measured_requests"] == r["completed"] and r["excluded_warmup"] > 0


def test_bench_frontier_smoke(tmp_path):
    from tiny import make_tiny_model

    # long max_model_len: the decode requests must outlive the measurement window
    model = make_tiny_model(tmp_path / "m", "llama", max_position_embeddings=8192, with_tokenizer=False)
    out = tmp_path / "frontier.json"
    assert main(["bench", "frontier", "--model", str(model), "--mode", "hybrid", "--chunks", "32",
                 "--batches", "2", "--ctx", "16", "--prefill-len", "64", "--window-s", "0.6",
                 "--max-model-len", "8192", "--output-json", str(out)]) == 0
    (point,) = json.loads(out.read_text())
    assert point["prefill_tok_s"] > 0 and point["decode_steps"] > 0 and point["tpot_mean_ms"] > 0
    device = point["device_time"]  # the window's steps on the decode stream: decode-only and mixed (chunk 32)
    assert device["mixed"]["steps"] > 0 and device["mixed"]["busy_s"] > 0
    assert all(t["idle_s"] >= 0 for t in device.values())


def test_bench_serve_configurations_are_modes_with_placement_and_split(capsys):
    """Every baseline of the adaptive issue in one run on the same traces: hybrid, static splits, adaptive."""
    from rapid.bench.serve import parse_configuration

    assert parse_configuration("hybrid") == ("hybrid", {})
    assert parse_configuration("rapid:adaptive") == ("rapid", {"placement": "adaptive"})
    assert parse_configuration("rapid:static:50/50") == (
        "rapid", {"placement": "static", "prefill_sm_percentage": 50, "decode_sm_percentage": 50})
    assert parse_configuration("rapid:adaptive:slo=300/15") == (
        "rapid", {"placement": "adaptive", "slo_ttft_ms": 300.0, "slo_tpot_ms": 15.0})
    # the prefill attention is every mode's option: hybrid with piecewise mixed steps (SDPA) beside its default
    assert parse_configuration("hybrid:attn=flash") == ("hybrid", {"prefill_attention": "flash"})
    assert parse_configuration("rapid:adaptive:attn=paged") == (
        "rapid", {"placement": "adaptive", "prefill_attention": "paged"})
    # the layout's cost: hybrid batching in rapid's processes, with and without MPS
    assert parse_configuration("rapid:mixed:nomps") == ("rapid", {"placement": "mixed", "use_mps": False})
    for bad, why in (("hybrid:attn=fast", "names no prefill attention"),
                     ("hybrid:attn=paged:attn=flash", "more than one prefill attention"),
                     ("fast", "the mode must be one of"), ("rapid:best", "neither a placement"),
                     ("hybrid:static", "mode 'rapid' only"), ("rapid:50/", "neither a placement"),
                     ("rapid:slo=fast/15", "needs numbers"), ("rapid:static:0/50", r"in \[1, 100\], got 0"),
                     ("rapid:slo=0/25", "positive number"), ("rapid:static:adaptive", "more than one placement"),
                     ("rapid:50/50:60/40", "more than one MPS split"), ("hybrid:nomps", "mode 'rapid' only"),
                     ("rapid:nomps:nomps", "more than one MPS off"), ("rapid:nomps:50/50", "means nothing with nomps"),
                     ("rapid:atom:p2=50:nomps", "means nothing with nomps")):
        with pytest.raises(ValueError, match=why):
            parse_configuration(bad)
    # checked before any engine starts (the model folder does not even exist): exit 2, the entry named
    assert main(["bench", "serve", "--model", "/nonexistent", "--modes", "hybrid,rapid:fast", "--duration-s", "1"]) == 2
    assert "'rapid:fast'" in capsys.readouterr().err


def test_engine_counters_per_rate_survive_a_restart():
    """Per rate: the counters' differences; after a restart (counters reset) the new incarnation's own counts."""
    from rapid.bench.serve import _engine_during

    before = {"prefill_tokens_by_lane": {"decode": 100}, "prefill_batches_by_lane": {"decode": 3}, "preemptions": 2,
              "restarts": 0, "device_time": {"decode": [10, 1.0, 0.5]},
              "prefill_batches_by_reason": {"decode: decode idle": 1, "decode: mixed step: cheaper": 2}}
    steady = {"prefill_tokens_by_lane": {"decode": 140}, "prefill_batches_by_lane": {"decode": 4}, "preemptions": 3,
              "restarts": 0, "device_time": {"decode": [30, 3.0, 0.75]},
              "prefill_batches_by_reason": {"decode: decode idle": 1, "decode: mixed step: cheaper": 3}}
    restarted = {"prefill_tokens_by_lane": {"decode": 40}, "prefill_batches_by_lane": {"decode": 1}, "preemptions": 0,
                 "restarts": 1, "device_time": {"decode": [5, 0.25, 0.0]},
                 "prefill_batches_by_reason": {"decode: decode idle": 1}}
    got = _engine_during(before, steady, "adaptive")
    assert got == {"placement_policy": "adaptive", "preemptions": 1, "restarts": 0,
                   "prefill_tokens_by_lane": {"decode": 40}, "prefill_batches_by_lane": {"decode": 1},
                   "prefill_batches_by_reason": {"decode: mixed step: cheaper": 1},  # reasons with no new batch drop
                   "device_time": {"decode": {"steps": 20, "busy_s": 2.0, "idle_s": 0.25}}}
    got = _engine_during(before, restarted, "adaptive")
    assert got["restarts"] == 1 and got["prefill_tokens_by_lane"] == {"decode": 40} and got["preemptions"] == 0
    assert got["prefill_batches_by_reason"] == {"decode: decode idle": 1}
    assert got["device_time"] == {"decode": {"steps": 5, "busy_s": 0.25, "idle_s": 0.0}}

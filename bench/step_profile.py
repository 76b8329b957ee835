"""Where a decode step's device time goes inside the engine: kernels by family, and the device's gaps between them.

For each decode batch B: B requests with `--ctx`-token prompts reach steady decode (sampling as `rapid bench
offline` does: temperature 0.6 and a seed per request, unless --greedy), then three windows of `--steps` engine
steps each:
  1. plain: the engine's own device timer (Stats.device_time: busy and idle per step, CUDA events);
  2. kernels: torch.profiler, CUDA activity only (little host perturbation): the kernels' time per step by family,
     the device's busy time (the union of kernel intervals) and its gaps between kernels, each gap named by the
     kernels on either side;
  3. trace: CPU and CUDA activity, exported as a gzipped Chrome trace for reading by hand, and the host's top
     operations by self time.
The step's busy time (1) against the kernels' union (2) says how much of the step the device spends waiting inside
it (for the host to enqueue the next piece of work); (3) says what the host was doing then.

    python3 bench/step_profile.py --model /tmp/llama8b --batches 1,64,256 --ctx 1000 --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import cuda_intervals, kernel_family, kernel_times_ms  # noqa: E402

from rapid import LLM  # noqa: E402
from rapid.bench.frontier import start_steady_decode  # noqa: E402
from rapid.bench.offline import device_time_during  # noqa: E402


def device_gaps(intervals: list[tuple[float, float, str]], steps: int) -> dict:
    """The union of the kernels' intervals, and the gaps between them grouped by the families on either side."""
    busy, gaps = 0.0, []
    cur_start, cur_end, last_name = intervals[0][0], intervals[0][1], intervals[0][2]
    for start, end, name in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, last_name, name))
            cur_start, cur_end = start, end
        if end >= cur_end:
            cur_end, last_name = end, name
    busy += cur_end - cur_start
    by_pair: dict[str, list[float]] = {}
    for us, before, after in gaps:
        by_pair.setdefault(f"{kernel_family(before)} -> {kernel_family(after)}", []).append(us)
    pairs = sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:10]
    window = intervals[-1][1] - intervals[0][0]
    return {"window_ms_per_step": round(window / steps / 1e3, 3),
            "busy_ms_per_step": round(busy / steps / 1e3, 3),
            "gap_ms_per_step": round(sum(g for g, _, _ in gaps) / steps / 1e3, 3),
            "gaps_per_step": round(len(gaps) / steps, 1),
            "gaps_by_neighbours_ms_per_step": {k: {"n_per_step": round(len(v) / steps, 1),
                                                   "ms_per_step": round(sum(v) / steps / 1e3, 3),
                                                   "max_us": round(max(v), 1)} for k, v in pairs},
            "largest_gaps_us": [(round(g, 1), b[:60], a[:60]) for g, b, a in sorted(gaps, reverse=True)[:12]]}


def kernels_by_family(intervals: list[tuple[float, float, str]], steps: int) -> dict:
    fams, names = kernel_times_ms(intervals, steps)
    return {"families_ms_per_step": dict(fams),
            "kernel_sum_ms_per_step": round(sum(end - start for start, end, _ in intervals) / steps / 1e3, 3),
            "top_kernels_ms_per_step": names[:15]}


def drive(engine, steps: int) -> list[float]:
    """`steps` engine steps (a hybrid engine runs one forward per get_deltas); each call's host wall time (ms)."""
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.get_deltas(timeout_s=0.05)
        walls.append((time.perf_counter() - t) * 1e3)
    return walls


def profile_batch(llm, batch: int, args, out_dir: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    ids = start_steady_decode(llm, batch, args.ctx, seed=batch, rng=random.Random(batch), poll_s=0.05,
                              temperature=0.0 if args.greedy else 0.6, seeded=not args.greedy)
    drive(engine, 20)  # warm
    res: dict = {"batch": batch, "ctx": args.ctx, "steps": args.steps}
    before = engine.get_stats().device_time
    walls = drive(engine, args.steps)
    plain = device_time_during(before, engine.get_stats().device_time)
    res["device_timer"] = {k: {"steps": v["steps"], "busy_ms_per_step": round(v["busy_s"] / v["steps"] * 1e3, 3),
                               "idle_ms_per_step": round(v["idle_s"] / v["steps"] * 1e3, 3)} for k, v in plain.items()}
    res["host_ms_per_call_median"] = round(statistics.median(walls), 3)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        drive(engine, args.steps)
        sync()
    intervals = cuda_intervals(prof)
    if intervals:  # none on the CPU (a dry run of the script)
        res["kernels"] = kernels_by_family(intervals, args.steps)
        res["device"] = device_gaps(intervals, args.steps)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        drive(engine, min(args.steps, 12))
        sync()
    res["host_top_self_ms"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    trace = out_dir / f"trace-b{batch}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    engine.abort(ids)
    deadline = time.monotonic() + 60
    while engine.get_stats().num_requests and time.monotonic() < deadline:
        engine.get_deltas(timeout_s=0.05)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--ctx", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--greedy", action="store_true", help="greedy rows (default: temperature 0.6, seeded, as offline)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    import torch

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    report = {"command": "python3 bench/step_profile.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "points": []}
    with LLM(args.model, mode="hybrid", load_format=args.load_format, skip_tokenizer_init=True,
             max_model_len=args.max_model_len, max_num_seqs=max(batches)) as llm:
        for b in batches:
            point = profile_batch(llm, b, args, out_dir)
            report["points"].append(point)
            print(json.dumps({k: v for k, v in point.items() if k != "host_top_self_ms"}, indent=1), flush=True)
            print(point["host_top_self_ms"], flush=True)
            (out_dir / "step-profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

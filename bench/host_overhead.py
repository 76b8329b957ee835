"""Host time around the kernels: the decode step period inside the engine against the graph replay alone.

For each engine configuration (mode, async scheduling on/off) and decode batch B in 1, 64, 256: B requests
with `--ctx`-token prompts decode steadily (ignore_eos, long outputs); the step period is the median
start-to-start interval of the decode steps with batch B over `--window-s` seconds (bench/kernels.py
measures the replay alone: 4.73 / 7.22 ms at ctx 1024, B 1 / 64 on the H200). What the engine adds
beyond the replay is host time on the critical path: the GPU idles for it between steps.

    python3 bench/host_overhead.py --model /tmp/llama8b --configs hybrid:async,hybrid:sync,rapid:async
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from rapid import LLM
from rapid.bench.frontier import start_steady_decode, step_periods


def run_window(llm, batch: int, ctx: int, window_s: float, seed: int) -> tuple[float, float]:
    """Reach steady decode at `batch`, drive it for window_s, abort it; the window's (start, end) wall times."""
    engine = llm.engine
    ids = start_steady_decode(llm, batch, ctx, seed, random.Random(seed), poll_s=0.05)
    t0 = time.time()
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        engine.get_deltas(timeout_s=0.05)
    t1 = time.time()
    engine.abort(ids)
    done = time.monotonic() + 30
    while engine.get_stats().num_requests and time.monotonic() < done:
        engine.get_deltas(timeout_s=0.05)
    return t0, t1


def measure(llm, batches, ctx, window_s) -> list[dict]:
    out = []
    for i, b in enumerate(batches):
        t0, t1 = run_window(llm, b, ctx, window_s, seed=i)
        s = llm.engine.get_stats()
        periods = sorted(x * 1e3 for x in step_periods(s, t0, t1, b))
        steps = len(periods) + 1 if periods else 0
        gaps = [g * 1e3 for g in s.decode_idle_gaps_s[-steps:]] if steps else []
        out.append({"batch": b, "ctx": ctx, "steps": len(periods),
                    "period_median_ms": round(statistics.median(periods), 3) if periods else None,
                    "period_p90_ms": round(periods[int(0.9 * (len(periods) - 1))], 3) if periods else None,
                    "host_gap_median_ms": round(statistics.median(gaps), 3) if gaps else None})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--configs", default="hybrid:async,hybrid:sync,rapid:async",
                    help="mode:async|sync, comma list (rapid runs at MPS 100/100)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    report = {"command": "python3 bench/host_overhead.py " + " ".join(f"--{k.replace('_', '-')}={v}"
                                                                      for k, v in vars(args).items()), "runs": []}
    for cfg in args.configs.split(","):
        mode, sched = cfg.split(":")
        extra = {"prefill_sm_percentage": 100, "decode_sm_percentage": 100} if mode == "rapid" else {}
        with LLM(args.model, mode=mode, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.max_model_len,
                 max_num_seqs=max(batches), async_scheduling=sched == "async", **extra) as llm:
            import torch

            report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            report["runs"].append({"mode": mode, "async_scheduling": sched == "async",
                                   "points": measure(llm, batches, args.ctx, args.window_s)})
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(report, f, indent=1)
    print("| mode | async | " + " | ".join(f"B={b} period (ms)" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for run in report["runs"]:
        cells = " | ".join(str(p["period_median_ms"]) for p in run["points"])
        print(f"| {run['mode']} | {run['async_scheduling']} | {cells} |")


if __name__ == "__main__":
    main()

"""Does MPS client priority let the decode worker's kernels go first beside a full prefill worker?

The frontier of `rapid bench frontier --mode rapid` (rapid/bench/frontier.py: B decodes at `--ctx`, prefill-only
requests kept queued, decode step time against prefill tokens/s in the same window) at each MPS split, once with the
prefill worker at the default client priority and once at CUDA_MPS_CLIENT_PRIORITY=1 ("below normal": the MPS
server then dispatches the decode worker's waiting work first; nothing already running is preempted). The engine has
no setting for it: this script adds the variable to the prefill worker's environment for the second run only.

    python3 bench/mps_priority_frontier.py --model /tmp/llama8b --splits 100/100,60/100 --batches 64,256 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import rapid.engine.processes as processes
from rapid.bench.frontier import run_frontier

plain_worker_env = processes.worker_env


def worker_env_with(priority: int):
    """worker_env, plus CUDA_MPS_CLIENT_PRIORITY for the prefill workers when `priority` is not 0."""
    def env(config, role, daemon):
        out = plain_worker_env(config, role, daemon)
        if out and priority and role.startswith("prefill"):
            out = {**out, "CUDA_MPS_CLIENT_PRIORITY": str(priority)}
        return out
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", default="100/100,60/100")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--priorities", default="0,1")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    splits = [tuple(int(x) for x in s.split("/")) for s in args.splits.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    report = {"command": "python3 bench/mps_priority_frontier.py " + " ".join(
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), "runs": []}
    for priority in (int(p) for p in args.priorities.split(",")):
        processes.worker_env = worker_env_with(priority)
        try:
            points = run_frontier(args.model, "rapid", splits, batches, args.ctx, args.prefill_len, args.window_s,
                                  load_format=args.load_format)
        finally:
            processes.worker_env = plain_worker_env
        report["runs"].append({"prefill_client_priority": priority, "points": points})
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "mps-priority-frontier.json").write_text(json.dumps(report, indent=1))
    print("| prefill priority | split | batch | decode alone ms | decode step mean ms | p90 ms | prefill tok/s |")
    print("|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        for p in run["points"]:
            print(f"| {run['prefill_client_priority']} | {p['split']} | {p.get('batch')} | {p.get('decode_alone_ms')} "
                  f"| {p.get('tpot_mean_ms')} | {p.get('tpot_p90_ms')} | {p.get('prefill_tok_s')} |")


if __name__ == "__main__":
    main()

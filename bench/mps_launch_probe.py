"""What one kernel launch costs on the device, by launch path: is MPS's cost per step, per graph, or per kernel?

Session 24 measured that a whole-graph step runs 0.53-0.85 ms longer as an MPS client, whatever its size
(`bench/mps_cost.sh`). A step graph holds some 540 kernels, so that is about 1.4 us a kernel if the cost is per
kernel. This times chains of K kernels (K = 1 .. 512) of two sizes, launched three ways, with CUDA events after
warm-up (median of --reps):
  * `graph`: the chain captured as one CUDA graph and replayed on an idle device (as the engine's steps are);
  * `graph-queued`: the same replay queued behind a sleep kernel, so the host's launch is off the clock;
  * `stream`: the K kernels launched one by one behind a sleep kernel, so only the device's gaps are timed.
It also counts the SMs that one kernel's blocks land on (`%smid`), to see whether an MPS client at 100% gets them all.
Run it once per MPS setting (bench/mps_cost.sh with PROBE=1 does), then `--summarize DIR` tabulates the variants.

    python3 bench/mps_launch_probe.py --out $OUT/mps-cost/no-mps
    python3 bench/mps_launch_probe.py --summarize $OUT/mps-cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

CHAIN_LENGTHS = (1, 16, 128, 512)
SLEEP_CYCLES = 60_000_000  # ~30 ms at H200 clocks: longer than launching 512 kernels from the host
WORKS = {
    "tiny": 1024,  # one add over 1,024 floats: a kernel of a few microseconds, all launch
    "copy": 4 * 1024 * 1024,  # an add over 4 Mi floats (32 MB moved): about 8 us of memory traffic at 4.3 TB/s
}


def chain(x: torch.Tensor, k: int) -> None:
    for _ in range(k):
        x.add_(1.0)


def sms_used(blocks: int = 132 * 16) -> int:
    """How many distinct SMs the blocks of one wide kernel run on (each block records its %smid)."""
    import triton
    import triton.language as tl

    @triton.jit
    def record_sm(out_ptr):
        block = tl.program_id(0)
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [block], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + block, sm)

    out = torch.full((blocks,), -1, dtype=torch.int32, device="cuda")
    record_sm[(blocks,)](out)
    torch.cuda.synchronize()
    return int(torch.unique(out).numel())


def time_ms(launch, reps: int, queued: bool) -> float:
    """Median device time of `launch()` between two events; `queued` puts a sleep kernel first."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queued:
            torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe(reps: int) -> list[dict]:
    points = []
    for work, numel in WORKS.items():
        x = torch.zeros(numel, device="cuda")
        for k in CHAIN_LENGTHS:
            chain(x, k)  # warm-up outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain(x, k)
            for _ in range(3):
                graph.replay()
            runs = {
                "graph": time_ms(graph.replay, reps, queued=False),
                "graph-queued": time_ms(graph.replay, reps, queued=True),
                "stream": time_ms(lambda: chain(x, k), reps, queued=True),
            }
            for launch, ms in runs.items():
                points.append({"work": work, "kernels": k, "launch": launch, "ms": round(ms, 4),
                               "us_per_kernel": round(1000 * ms / k, 3)})
                print(f"launch {launch:12s} work {work:4s} kernels {k:4d}: {ms:8.4f} ms, "
                      f"{1000 * ms / k:7.3f} us a kernel", flush=True)
            del graph
    return points


def summarize(root: Path) -> str:
    """One table: us a kernel at each chain length, per launch path and MPS variant (the runs under `root`)."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/launch-probe.json"))}
    if not runs:
        raise SystemExit(f"no */launch-probe.json under {root}")
    names = list(runs)
    lines = ["| launch | work | kernels | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    lines.append("| SMs one kernel's blocks ran on | | | " + " | ".join(str(runs[n].get("sms_used")) for n in names) + " |")
    first = runs[names[0]]["points"]
    for i, point in enumerate(first):
        cells = [f"{runs[n]['points'][i]['ms']:.4f} ms ({runs[n]['points'][i]['us_per_kernel']:.2f} us/k)"
                 for n in names]
        lines.append(f"| {point['launch']} | {point['work']} | {point['kernels']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (root / "launch-probe.md").write_text(
        "# One kernel's device time by launch path and MPS setting (`bench/mps_launch_probe.py`)\n\n"
        "Median of the replays, CUDA events; us/k is the chain's time over its kernels.\n\n" + table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for launch-probe.json")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--summarize", type=Path, help="tabulate the variants' launch-probe.json under this folder")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.out is None or not torch.cuda.is_available():
        raise SystemExit("needs --out and a CUDA device (or --summarize DIR)")
    points = probe(args.reps)
    sms = sms_used()
    print(f"launch sms used by one kernel of {132 * 16} blocks: {sms} "
          f"(device reports {torch.cuda.get_device_properties(0).multi_processor_count})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python3 bench/mps_launch_probe.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "mps_pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
        "mps_thread_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
        "sms_used": sms, "sms_reported": torch.cuda.get_device_properties(0).multi_processor_count,
        "points": points,
    }
    (args.out / "launch-probe.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

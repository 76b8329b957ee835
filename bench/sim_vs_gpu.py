"""Session 20's serving runs on the H200 against the simulator, on the very requests the GPU served.

For every configuration and rate in bench/results/session20/call*/*/serve.json, the requests of the run (arrival
time, prompt and output length: serve.json's records) are replayed by rapid.bench.simulate through the engine's
own placement policy, on the H200's recorded step timings as bench/summarize_h200.py builds them, with the run's
token budget (--max-num-batched-tokens). Both sides are measured as `rapid bench serve` measures: the requests that
arrived inside [warm-up, duration], TPOT over those with more than one output token, attainment = both SLOs met.
Steps (whole rate, both sides): the mean decode-only and mixed step and the mean prefill-worker batch (ms; on the
GPU its CUDA-event device_time), and the decode rows a step (output tokens after the first over the steps).
GPU and simulated figures side by side as gpu/sim. Run: PYTHONPATH=. python bench/sim_vs_gpu.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from result_files import read_json  # bench/: this script's own folder
from summarize_h200 import h200_step_timings as timings

from rapid.bench.simulate import simulate
from rapid.core.adaptive import AdaptivePlacement
from rapid.core.placement import DECODE, PREFILL, PREFILL2, AtomPlacement, StaticPlacement

R = Path(__file__).parent / "results"
SLO = (300, 15)  # TTFT, TPOT ms: the tightest pair session 20 measured


def configuration(label: str, budget: int):
    """A --modes entry -> (policy, the prefill worker's timings, the second prefill worker's or None)."""
    mode, *parts = label.split(":")
    opts = dict(p.split("=", 1) for p in parts if "=" in p)
    if mode == "hybrid":
        return StaticPlacement(DECODE), timings("100/100"), None
    if "atom" in parts:
        return AtomPlacement(), timings("100/100"), timings(f"{opts['p2']}/100")
    if "adaptive" in parts:
        ttft, tpot = (float(x) for x in opts["slo"].split("/")) if "slo" in opts else (None, None)
        return AdaptivePlacement(budget, ttft, tpot), timings("100/100"), None
    raise ValueError(f"no simulated configuration for {label!r}")


def latencies(reqs) -> dict:
    """reqs: (prompt_len, output_len, ttft_ms, tpot_ms) of the measured requests."""
    ttft = [r[2] for r in reqs]
    tpot = [r[3] for r in reqs if r[1] > 1]
    ok = sum(r[2] <= SLO[0] and (r[3] if r[1] > 1 else 0.0) <= SLO[1] for r in reqs)
    return {"tpot": (np.percentile(tpot, 50), np.percentile(tpot, 99)),
            "ttft": (np.percentile(ttft, 50), np.percentile(ttft, 99)), "attainment": ok / len(reqs)}


def steps(device_time: dict, output_lens) -> dict:
    """Mean ms of decode-only steps, mixed steps and prefill-worker batches; decode rows a step."""
    def mean_ms(*kinds):
        n = sum(device_time.get(k, {}).get("steps", 0) for k in kinds)
        return 1e3 * sum(device_time.get(k, {}).get("busy_s", 0.0) for k in kinds) / n if n else None
    n_steps = sum(device_time.get(k, {}).get("steps", 0) for k in ("decode", "mixed"))
    return {"decode": mean_ms("decode"), "mixed": mean_ms("mixed"), "prefill": mean_ms(PREFILL, PREFILL2),
            "rows": sum(o - 1 for o in output_lens if o > 1) / n_steps}


def compare(label: str, budget: int, rate: dict) -> dict:
    records = [r for r in rate["records"] if r[4] and r[1] > 0]  # prompt, output, ttft s, latency s, ok, arrival s
    window = (rate["warmup_s"], rate["duration_s"])
    gpu = [(p, o, t * 1e3, (lat - t) * 1e3 / (o - 1) if o > 1 else 0.0) for p, o, t, lat, _, a in records
           if window[0] <= a <= window[1]]
    policy, first, second = configuration(label, budget)
    run = simulate([(a, p, o) for p, o, _, _, _, a in records], policy, first, max_budget=budget, second=second,
                   chunk_every_other_step=True)  # session 20 ran on a1995ac, before 6bf67b2
    sim = [(r.prompt_len, r.output_len, r.ttft_ms, r.tpot_ms) for r in run.requests
           if window[0] <= r.arrival_s <= window[1]]
    sim_device = {k: {"steps": n, "busy_s": s} for k, (n, s) in run.device_time.items()}
    outs = [r[1] for r in records]
    placed = sum(v for k, v in run.placed.items() if k != DECODE) / max(sum(run.placed.values()), 1)
    gpu_lanes = rate["engine"]["prefill_tokens_by_lane"]
    return {"gpu": latencies(gpu) | steps(rate["engine"]["device_time"], outs)
            | {"worker": 1 - gpu_lanes.get(DECODE, 0) / max(sum(gpu_lanes.values()), 1)},
            "sim": latencies(sim) | steps(sim_device, outs) | {"worker": placed}}


def runs():
    """(call, mode label, token budget, per-rate entry) of every session 20 serve.json."""
    for path in sorted({p.with_name("serve.json") for p in (R / "session20").glob("call*/*/serve.json*")}):
        d = read_json(path)
        args = dict(a[2:].split("=", 1) for a in d["command"].split() if a.startswith("--") and "=" in a)
        workload = ("3000 in" if args["dataset-name"] == "random" else
                    "bursty" if float(args["burstiness"]) != 1 else "poisson")
        for label, mode in d["modes"].items():
            for rate in mode["per_rate"]:
                yield path.parent.parent.name, workload, label, int(args["max-num-batched-tokens"]), rate


def main() -> None:
    def pair(key, i=None, fmt="{:.1f}"):
        g, s = (side[key] if i is None else side[key][i] for side in (res["gpu"], res["sim"]))
        return "/".join("-" if x is None else fmt.format(x) for x in (g, s))

    print(f"GPU/sim. Attainment at {SLO[0]}/{SLO[1]}; steps in ms; worker: share of prompt tokens on prefill workers")
    print("| call | workload | configuration | rate | TPOT p50 | TPOT p99 | TTFT p50 | TTFT p99 | attainment "
          "| decode step | mixed step | prefill batch | rows/step | worker |")
    print("|---" * 14 + "|")
    for call, workload, label, budget, rate in runs():
        res = compare(label, budget, rate)
        print(f"| {call} | {workload} | {label} | {rate['request_rate']:g} | {pair('tpot', 0)} | {pair('tpot', 1)} "
              f"| {pair('ttft', 0, '{:.0f}')} | {pair('ttft', 1, '{:.0f}')} | {pair('attainment', fmt='{:.3f}')} "
              f"| {pair('decode', fmt='{:.2f}')} | {pair('mixed')} | {pair('prefill')} | {pair('rows', fmt='{:.0f}')} "
              f"| {pair('worker', fmt='{:.2f}')} |", flush=True)


if __name__ == "__main__":
    main()

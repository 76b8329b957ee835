"""Collect the H200 runs of sessions 12 to 17 (bench/results/session1*/) into the committed result files.

    python bench/summarize_h200.py

Writes bench/results/offline-h200.{json,md,png}, frontier-h200.{json,md} + frontier-h200-b{16,64,256}.png,
http-overhead-h200.{json,md}, from what sessions 12 to 14 brought back, and sim-h200-timings.{json,md} with
sim-*.png: the placement policies replayed by rapid.bench.simulate on the H200's recorded frontier (sessions 13-14,
was not recorded). Every GPU figure comes from a JSON written on the GPU by the command recorded beside it.
"""

from __future__ import annotations

from pathlib import Path

from rapid.bench.metrics import RequestRecord
from rapid.bench.plots import plot_attainment, plot_frontier
from rapid.bench.results import mode_summary
from rapid.bench.steady import stability
from result_files import has_json, read_json, write_json  # bench/: this script's own folder

R = Path("bench/results")
DEVICE = "NVIDIA H200 (nvidia-h200), torch 2.11.0+cu130"
MODEL = "Llama-3.1-8B shapes, random bf16 weights (--load-format dummy), block size 16"
ROOFLINES = {"hbm_copy_tb_s": 4.3, "bf16_tflop_s": 790}


def _write(name: str, data, table: str) -> None:
    written = write_json(R / f"{name}.json", data)
    (R / f"{name}.md").write_text(table)
    print("wrote", written, R / f"{name}.md")


def offline() -> None:
    runs = []
    for label, file in (("hybrid, max_num_seqs 256, 8192 tokens (the old defaults)", "session12/offline1k-hybrid-old-defaults.json"),
                        ("hybrid, max_num_seqs = KV pool tokens / 1024 (value not recorded by this run), 16384 tokens", "session12/offline1k-hybrid.json"),
                        ("rapid static 100/100, the same limits", "session12/offline1k-rapid-100-100.json"),
                        ("hybrid, max_num_seqs 512, admission reserving every request's max_tokens (--admission-reserve 1)",
                         "session13/callb/offline1k-hybrid-reserve1-512.json"),
                        ("hybrid, the fitted defaults (session 14, call C)", "session14/callc/offline1k-hybrid.json"),
                        ("rapid, MPS 100/100, the adaptive placement (mode rapid's default; session 14, call C, the same "
                         "call as the row above)", "session14/callc/offline1k-rapid-100-100.json"),
                        ("512 requests: hybrid, the fitted defaults (session 15, call 2)",
                         "session15/call2/offline1k-hybrid-512.json"),
                        ("512 requests: rapid, MPS 100/100, the adaptive placement (session 15, call 3)",
                         "session15/call3/offline1k-rapid-100-100-512.json"),
                        ("hybrid, the fitted defaults, the one-pass sampler (session 16, call 1)",
                         "session16/call1/offline1k-hybrid-1024.json"),
                        ("rapid, MPS 100/100, the adaptive placement, the one-pass sampler (session 16, call 1, the same "
                         "call as the row above)", "session16/call1/offline1k-rapid-100-100-1024.json"),
                        ("hybrid, the fitted defaults, the one-pass sampler and the start-up heap frozen out of garbage "
                         "collection (session 16, call 2)", "session16/call2/offline1k-hybrid-1024.json"),
                        ("hybrid, the fitted defaults, the sampled token's logprob in one pass (session 17, call 2)",
                         "session17/call2/offline1k-hybrid-s17b.json"),
                        ("rapid, MPS 100/100, the adaptive placement (session 17, call 2, the same call as the row above)",
                         "session17/call2/offline1k-rapid-100-100-s17b.json"),
                        ("hybrid, the fitted defaults, full garbage collections 10x rarer (session 17, call 4)",
                         "session17/call4/offline1k-hybrid-s17c.json"),
                        ("hybrid, paged prefill attention: mixed steps as whole graphs (session 18, call 2)",
                         "session18/call2/offline1k-hybrid-paged.json"),
                        ("rapid, MPS 100/100, the adaptive placement, paged prefill attention, the decode worker's mixed "
                         "steps in graphs (session 18, call 2, the same call as the row above)",
                         "session18/call2/offline1k-rapid-100-100-paged.json"),
                        ("hybrid, flash SDPA: mixed steps piecewise (session 18, call 4, the same machine as call 2)",
                         "session18/call4/offline1k-hybrid-flash.json")):
        path = R / file
        if has_json(path):
            runs.append({"setting": label, "source": file, **read_json(path)})
    def device(r):  # busy (and idle) seconds per step kind on each worker's stream, CUDA events
        times = r.get("engine", {}).get("device_time")
        if not times:
            return "not recorded"
        return "; ".join(f"{k} {t['steps']:,} steps {t['busy_s']:.1f} s busy, {t['idle_s']:.1f} s idle"
                         for k, t in times.items())
    rows = "\n".join(f"| {r['setting']} | {r['output_throughput_tok_s']:,.0f} | {r['elapsed_s']:.1f} s | "
                     f"{r.get('engine', {}).get('num_preemptions', 'not recorded')} | {device(r)} |" for r in runs)
    table = (f"# Offline throughput on the H200: 1,024 requests, 1000 tokens in and 1000 out\n\n{DEVICE}. {MODEL}.\n"
             "Command: `bash bench/gpu_session.sh offline1k` with NUM_SEQS=1024 (`rapid bench offline --num-seqs 1024 "
             "--min/max-input-len 1000 --min/max-output-len 1000`); each run's full command is in its JSON. Device "
             "time (session 15 on): each step's time on its worker's CUDA stream between events recorded before and "
             "after it, summed per kind (decode: decode rows only; mixed: decode rows and prompt tokens; inline: "
             "prompt tokens only, on the decode worker; prefill: the prefill worker), and each stream's idle time "
             "between steps.\n\n"
             "| setting | output tok/s | elapsed | preemptions | device time |\n|---|---|---|---|---|\n" + rows + "\n")
    _write("offline-h200", {"device": DEVICE, "model": MODEL, "rooflines": ROOFLINES, "runs": runs}, table)


def frontier() -> list[dict]:
    points = []
    # session 29's call (100/100, 100/75, 100/60, 50/50 and hybrid, one machine) and session 14's restricted prefill
    # shares (30/100, 50/100; its 50/50 was measured again). Session 13's points stay in session13/calld as history.
    files = {"session29/call2/frontier-rapid.json": None, "session29/call2/frontier-hybrid.json": None,
             "session14/calla/frontier-rapid.json": ("30/100", "50/100")}
    if not all(has_json(R / f) for f in files):  # half a frontier would overwrite the simulator's recording
        print("frontier: missing", [f for f in files if not has_json(R / f)])
        return points
    for file, splits in files.items():
        points += [{**p, "source": file} for p in read_json(R / file) if splits is None or p.get("split") in splits]
    for p in points:  # decode time lost per prompt token prefilled: (window - decode steps x step alone) / tokens
        known = p.get("tpot_mean_ms") and p.get("decode_alone_ms") and p.get("prefill_tok_s")
        lost = 1 - p["decode_alone_ms"] / p["tpot_mean_ms"] if known else None
        p["decode_us_per_prompt_token"] = round(lost / p["prefill_tok_s"] * 1e6, 1) if known else None
    cmd = ("bash bench/gpu_session.sh frontier-rapid frontier-hybrid with BATCHES=16,64,256 WINDOW=1.5: session 29 "
           "SPLITS=100/100,100/75,100/60,50/50 CHUNKS=2048, session 14 SPLITS=30/100,50/100 (rapid bench frontier "
           "--ctx 1024 --prefill-len 2048)")
    data = {"command": cmd, "device": DEVICE, "model": MODEL, "rooflines": ROOFLINES,
            "tpot": "start-to-start time of consecutive decode steps of the batch, host gaps included",
            "points": points}
    rows = "\n".join(f"| {p['mode']} | {p.get('split') or 'chunk ' + str(p.get('chunk'))} | {p['batch']} | "
                     f"{p['decode_alone_ms']} | {p['tpot_mean_ms']} / {p['tpot_p90_ms']} | {p['prefill_tok_s']:,.0f} | "
                     f"{p['decode_us_per_prompt_token']} |" for p in points)
    table = (f"# TPOT against prefill throughput on the H200, through the engine's workers\n\n{DEVICE}. {MODEL}.\n"
             f"Command: `{cmd}`. Decode: B requests with 1024-token prompts decoding; prefill: 2048-token prompts kept "
             "queued (max_tokens=1). rapid points use placement='static' (every prompt on the prefill worker); the "
             "setting is the MPS split prefill/decode. The last column is what one prompt token costs the running "
             "decodes: (1 - decode alone / TPOT) / prefill tok/s, in us.\n\n"
             "| mode | setting | batch | decode alone (ms) | TPOT mean / p90 (ms) | prefill tok/s | decode us per prompt "
             "token |\n|---|---|---|---|---|---|---|\n" + rows + "\n")
    _write("frontier-h200", data, table)
    for batch in sorted({p["batch"] for p in points}):
        series: dict[str, list] = {}
        for p in points:
            if p["batch"] == batch and p.get("tpot_mean_ms"):
                label = p.get("split") or f"C={p.get('chunk')}"
                series.setdefault(p["mode"], []).append((p["tpot_mean_ms"], p["prefill_tok_s"], label))
        plot_frontier(series, R / f"frontier-h200-b{batch}.png", f"H200, decode batch {batch}: TPOT vs prefill")
    return points


HTTP_RUNS = {  # label -> serve.json; each pair (HTTP, in process) ran in one device call on the same trace
    "HTTP, engine in the server's process (session 13, call A)": "session13/http-openai/serve.json",
    "in process (session 13, call A)": "session13/http-inproc/serve.json",
    "HTTP, engine in its own process (rapid serve's default since; session 13, call B)": "session13/callb/http-openai/serve.json",
    "in process (session 13, call B)": "session13/callb/http-inproc/serve.json",
    "HTTP, engine in its own process, after the stall fixes (session 14, call A)": "session14/calla/http-openai/serve.json",
    "in process (session 14, call A)": "session14/calla/http-inproc/serve.json",
}


def http_overhead() -> None:
    runs = {label: read_json(R / f) for label, f in HTTP_RUNS.items() if has_json(R / f)}
    if not runs:
        print("http: no runs")
        return

    lines = []
    for backend, d in runs.items():
        for mode in d["modes"].values():
            for r in mode["per_rate"]:
                lines.append(f"| {backend} | {r['request_rate']:g} | {r['served_rate']:.2f} | {r['p50_ttft_ms']:.1f} / "
                             f"{r['p99_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} / {r['p99_tpot_ms']:.2f} | "
                             f"{r['p50_itl_ms']:.2f} | {r['output_throughput']:.0f} |")
    table = (f"# The HTTP server against the in-process engine on the H200\n\n{DEVICE}. {MODEL}. Mode hybrid.\n"
             "Command: `bash bench/gpu_session.sh http` (each run's full command is in the JSON): the same "
             "ShareGPT-like trace through `rapid serve`'s /v1/completions (streamed, `rapid bench serve --backend "
             "openai`) and through the engine in process (`--backend inproc`).\n\n"
             "| run | rate | served req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 (ms) | output tok/s |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    _write("http-overhead-h200", {"device": DEVICE, "model": MODEL, "sources": HTTP_RUNS, "runs": runs}, table)


S15 = "serve-sharegpt-like-hybrid-rapid-static-rapid-atom-p2-50-rapid-adaptive-slo-300-15"
POLICY_RUNS = {  # workload -> serve.json of one device call (every configuration on the same traces)
    "ShareGPT-like, Poisson, 30 s at 44 and 56 req/s, warm-up 7 s; attn=paged: mixed steps as whole graphs, rapid's "
    "decode worker capturing them (session 18, call 3)":
        "session18/call3/serve-sharegpt-like-hybrid-hybrid-attn-paged-rapid-adaptive-attn-paged-s18b/serve.json",
    "ShareGPT-like, Poisson, 30 s at 50 req/s, warm-up 7 s (session 17's trace); attn=paged as above, rapid's decode "
    "worker running its mixed steps without graphs (session 18, call 1)":
        "session18/call1/serve-sharegpt-like-hybrid-hybrid-attn-paged-rapid-adaptive-rapid-adaptive-attn-paged-s18/"
        "serve.json",
    "ShareGPT-like, Poisson, 30 s at 50 req/s, warm-up 7 s, every core in a child process, full garbage collections "
    "10x rarer (session 17, call 4)": "session17/call4/serve-sharegpt-like-hybrid-rapid-adaptive-gc/serve.json",
    "The same trace, every core in a child process (session 17, call 3)":
        "session17/call3/serve-sharegpt-like-hybrid-rapid-adaptive/serve.json",
    "ShareGPT-like, Poisson, 30 s at 50 req/s, warm-up 7 s (session 16, call 3)":
        "session16/call3/serve-sharegpt-like-hybrid-rapid-adaptive-slo-300-15-rapid-adaptive-p2-50-slo-300-15/serve.json",
    "The same trace again (session 16, call 4)": "session16/call4/serve-sharegpt-like-hybrid-rapid-adaptive/serve.json",
    "ShareGPT-like, Poisson, 25 s per rate, warm-up 7 s (session 15, call 1)": f"session15/call1/{S15}/serve.json",
    "ShareGPT-like, bursty (gamma 0.5), 20 s per rate, warm-up 5 s (session 15, call 2)":
        f"session15/call2/{S15}-bursty/serve.json",
    "ShareGPT-like, 20 s per rate, warm-up 5 s (session 14, call B2)":
        "session14/callb2/serve-sharegpt-like-hybrid-rapid-adaptive-slo-300-15-rapid-atom-p2-50-rapid-adaptive-p2-50-slo-"
        "300-15-rapid-static/serve.json",
    "3000 in / 300 out, 30 s per rate, warm-up 6 s (session 14, call C)":
        "session14/callc/serve-random3k-hybrid-rapid-adaptive-slo-300-15/serve.json",
}


def reread(run: dict) -> dict:
    """A run written before session 15's stability rule, read again under it: each rate's verdict recomputed
    from its stored records (start time taken as the arrival time: the records keep only the arrival), then
    goodput and saturation over the new verdicts. Runs under the current rule are returned unchanged."""
    if "a server keeping up" in (run.get("method") or {}).get("stability_rule", ""):
        return run
    pairs = [tuple(float(x) for x in k.split("/")) for k in run["slo_pairs"]]
    for name, mode in run["modes"].items():
        for r in mode["per_rate"]:
            recs = [RequestRecord(prompt_len=p, output_len=o, arrival_time=a, start_time=a, ttft=t, latency=lat,
                                  success=ok) for p, o, t, lat, ok, a in r["records"]]
            r["stability"] = stability(recs, r["warmup_s"], r["duration_s"])
            r["stability"]["reread"] = "session 15's rule, from the stored records"
        run["modes"][name] = mode_summary(mode["per_rate"], mode.get("num_gpus", 1), pairs)
    return run


def goodput_lines(workload: str, run: dict) -> list[str]:
    """Per SLO pair: each configuration's goodput (stable rates only) against hybrid and the best other one."""
    lines = []
    for pair in ("1000/50", "500/25", "300/15"):
        good = {name: mode["goodput_by_slo"].get(pair) for name, mode in run["modes"].items()}
        if not all(good.values()):
            continue

        def text(g):
            return ("< lowest rate" if g["below_range"] else f"{g['rate']:.1f}" + (" or more" if g["is_lower_bound"]
                                                                                  else ""))
        rates = {n: g["rate"] for n, g in good.items()}
        for name, g in good.items():
            others = [r for n, r in rates.items() if n != name and not n.startswith("rapid:adaptive")]
            vs_hybrid = f"{g['rate'] / rates['hybrid']:.2f}x" if rates.get("hybrid") and g["rate"] else "-"
            vs_best = f"{g['rate'] / max(others):.2f}x" if others and max(others) > 0 and g["rate"] else "-"
            lines.append(f"| {workload} | {pair} | {name} | {text(g)} | {vs_hybrid} | {vs_best} |")
    return lines


def policies() -> None:
    """The placement policies against hybrid on the GPU, per workload: attainment at the three SLO pairs."""
    runs = {label: reread(read_json(R / f)) for label, f in POLICY_RUNS.items() if has_json(R / f)}
    lines = []
    for workload, d in runs.items():
        for name, mode in d["modes"].items():
            for r in mode["per_rate"]:
                lanes = r.get("engine", {}).get("prefill_tokens_by_lane", {})
                placed = " / ".join(f"{lanes.get(k, 0):,}" for k in ("decode", "prefill", "prefill2") if k in lanes)
                att = " / ".join(f"{r['attainment'].get(p, 0):.3f}" for p in ("1000/50", "500/25", "300/15"))
                verdict = "stable" if r["stability"]["stable"] else "unstable: " + "; ".join(r["stability"]["reasons"])
                lines.append(f"| {workload} | {name} | {r['request_rate']:g} | {r['served_rate']:.2f} | "
                             f"{r['p50_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | {r['p50_tpot_ms']:.1f} / "
                             f"{r['p99_tpot_ms']:.1f} | {att} | {placed} | {verdict} |")
    goodput = [line for workload, d in runs.items() for line in goodput_lines(workload, d)]
    for workload, d in runs.items():  # attainment against rate, every configuration on one set of axes
        slug = "bursty" if "bursty" in workload else "sharegpt" if "session 15" in workload else None
        for pair in ("500/25", "300/15") if slug else ():
            plot_attainment({n: [(r["request_rate"], r["attainment"][pair]) for r in m["per_rate"]]
                             for n, m in d["modes"].items()}, R / f"policies-h200-{slug}-{pair.replace('/', '-')}.png",
                            f"H200, {workload.split(',')[0]} {workload.split(',')[1].strip()}: {pair} ms",
                            unstable={n: [r["request_rate"] for r in m["per_rate"] if r["stability"]["stable"] is False]
                                      for n, m in d["modes"].items()})
    table = (f"# The placement policies against hybrid batching on the H200\n\n{DEVICE}. {MODEL}.\n"
             "Command: `bash bench/gpu_session.sh serve` / `serve-3k` with MODES as the configuration column (`rapid "
             "bench serve`, `--max-num-batched-tokens 2048`, MPS 100/100; `p2=50`: a second prefill worker at 50% of "
             "the SMs; each run's full command is in its serve.json). Every configuration of a workload ran on the same "
             "traces in one device call. Attainment: share of measured requests meeting both SLOs (TTFT / TPOT ms). "
             "Placed: prompt tokens on the decode lane (mixed steps) / the prefill worker (/ the second one). Verdicts "
             "under session 15's stability rule (rapid/bench/steady.py: the served count against what a server keeping "
             "up would finish, each request at its own output length and the run's mean TTFT and time per token); "
             "session 14's runs were read again under it from their stored records (`reread`).\n\n"
             "## Goodput (stable rates only, interpolated where attainment crosses 90%)\n\n"
             "vs best other: against the best configuration that is not adaptive (hybrid, static, the ATOM rule). "
             "'or more': every measured rate met 90%, so the goodput is at least the highest rate measured.\n\n"
             "| workload | SLO TTFT/TPOT (ms) | configuration | goodput (req/s) | vs hybrid | vs best other |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(goodput) + "\n\n## Every rate\n\n"
             "| workload | configuration | rate | served req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | attainment "
             "1000/50 / 500/25 / 300/15 | placed | verdict |\n|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(lines) + "\n")
    _write("policies-h200", {"device": DEVICE, "model": MODEL, "sources": POLICY_RUNS, "runs": runs}, table)


def h200_step_timings(split: str):
    """The simulator's H200 timings at an MPS split: the frontier's decode steps, mixed steps costed as the whole
    CUDA graphs the engine runs since session 18 (session 19's curve), decode steps moved by their batch's context
    (the frontier decodes at 1024 tokens a row; traces are shorter)."""
    from rapid.bench.simulate import H200_8B_ATTENTION_MS_PER_CONTEXT_TOKEN, StepTimings

    return (StepTimings.from_frontier(R / "frontier-h200.json", split)
            .with_graph_curve(R / "session19" / "call1" / "graph-buckets.json")
            .with_context_cost(H200_8B_ATTENTION_MS_PER_CONTEXT_TOKEN))


def simulation() -> None:
    """Attainment against rate for hybrid, static concurrent prefill and the adaptive policy, simulated."""
    from rapid.bench.datasets import random_requests, sharegpt_like_requests
    from rapid.bench.simulate import sim_trace, simulate
    from rapid.core.adaptive import AdaptivePlacement
    from rapid.core.placement import DECODE, PREFILL, PREFILL2, AtomPlacement, StaticPlacement

    splits = {s: h200_step_timings(s) for s in ("100/100", "50/100", "50/50")}
    full, half = splits["100/100"], splits["50/100"]  # frontier() writes the file first
    configurations = {  # name -> (policy factory given the SLO pair, the prefill worker's split, the second's)
        "hybrid": (lambda ttft, tpot: StaticPlacement(DECODE), full, None),
        "rapid static 100/100": (lambda ttft, tpot: StaticPlacement(PREFILL), full, None),
        "rapid static 50/100": (lambda ttft, tpot: StaticPlacement(PREFILL), half, None),
        "rapid static 50/50": (lambda ttft, tpot: StaticPlacement(PREFILL), splits["50/50"], None),
        "ATOM rule (100/100, 50/100 beside >= 64 decodes)": (lambda ttft, tpot: AtomPlacement(), full, half),
        "adaptive": (lambda ttft, tpot: AdaptivePlacement(8192, ttft, tpot), full, None),
        "adaptive with a 50% prefill worker": (
            lambda ttft, tpot: AdaptivePlacement(8192, ttft, tpot, prefill_lanes=(PREFILL, PREFILL2)), full, half),
    }
    sharegpt = sharegpt_like_requests(1500, 1000, seed=0, max_len=4096)  # outputs capped as the GPU runs cap them
    workloads = {"sharegpt-like": (lambda rate: sim_trace(sharegpt, rate, max_tokens_cap=512),
                                   (10, 20, 30, 40, 44, 48, 52, 56, 60)),
                 "bursty sharegpt-like (gamma 0.5)": (lambda rate: sim_trace(sharegpt, rate, 0.5, max_tokens_cap=512),
                                                      (10, 20, 30, 40, 44, 48, 52, 56, 60)),
                 "3000 in, 300 out": (lambda rate: sim_trace(random_requests(400, 3000, 300, 0.2, 1000, seed=0), rate),
                                      (1, 2, 3, 4, 5, 6, 7, 8))}
    results, lines = {}, []
    for wname, (make, rates) in workloads.items():
        for ttft, tpot in ((1000, 50), (500, 25), (300, 15)):
            series = {name: [] for name in configurations}
            for rate in rates:
                trace = make(rate)
                for name, (policy, timings, second) in configurations.items():
                    run = simulate(trace, policy(ttft, tpot), timings, second=second)
                    series[name].append((rate, run.attainment(ttft, tpot)))
            results[f"{wname} {ttft}/{tpot}"] = series
            for name, pts in series.items():
                lines.append(f"| {wname} | {ttft}/{tpot} | {name} | " + " ".join(f"{r:g}:{a:.2f}" for r, a in pts) + " |")
            slug = {"sharegpt-like": "sharegpt", "3000 in, 300 out": "3000"}.get(wname, "bursty")
            plot_attainment(series, R / f"sim-{slug}-{ttft}-{tpot}.png",
                            f"Simulated (H200 timings): {wname}, {ttft} ms / {tpot} ms")
    table = ("# The placement policies in simulation (rapid.bench.simulate), on the H200's recorded step timings\n\n"
             "Not a GPU measurement: the H200 frontier (frontier-h200.json: MPS splits and hybrid points), with mixed "
             "steps costed on the H200's whole-graph step-cost curve (session19/call1/graph-buckets.json, padded to "
             "the buckets the engine keeps) and decode steps moved by their batch's context (decode attention's cost "
             "per token of context, session 17's profile), replayed through the same policy objects the engine runs; "
             "each trace runs to completion (no warm-up cut). "
             "Attainment = share of requests meeting both SLOs. `python bench/summarize_h200.py` rebuilds it.\n\n"
             "| workload | SLO TTFT/TPOT (ms) | policy | rate:attainment |\n|---|---|---|---|\n"
             + "\n".join(lines) + "\n")
    _write("sim-h200-timings", {"timings": "frontier-h200.json, splits 100/100, 50/100, 50/50; mixed steps: "
                                "session19/call1/graph-buckets.json; decode steps by context: session17/call1",
                                "results": results},
           table)


if __name__ == "__main__":
    offline()
    frontier()
    http_overhead()
    policies()
    simulation()

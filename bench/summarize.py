"""Collect the H100 session outputs (bench/results/session*/) into the committed result files.

    python bench/summarize.py

Writes bench/results/frontier-h100.{json,md,png} and bench/results/serve-h100.{json,md} + attainment-h100.png.
Every figure here was measured by the command recorded in the session logs; nothing is typed in by hand
except GPU_NOTES.md's plain-PyTorch reference points, labelled as such.
"""

from __future__ import annotations

import json
from pathlib import Path

from rapid.bench.metrics import RequestRecord, goodput_rate, slo_attainment
from rapid.bench.plots import plot_attainment, plot_frontier

R = Path("bench/results")
DEVICE = "NVIDIA H100 80GB HBM3 (nvidia-h100-x1), torch 2.11.0+cu130"
MODEL = "Llama-3.1-8B shapes, random bf16 weights (--load-format dummy), block size 16"

# Which session file holds the final version of each series (sessions 2-4 ran the code with piecewise
# CUDA graphs for prefill/mixed batches; session 1 did not, so its rapid 100/100 point is kept, labelled).
FRONTIER_SOURCES = [
    ("session10/frontier-hybrid.json", "piecewise graphs, T-only dynamic compile, flash prefill (session 10)"),
    ("session3/frontier-hybrid.json", "piecewise graphs"),
    ("session2/frontier-rapid.json", "piecewise graphs"),
    ("session4/frontier-rapid.json", "piecewise graphs"),
    ("session1/frontier-rapid.json", "no prefill graphs (session 1)"),
]
# GPU_NOTES.md, probes/overlap_probe.py: one graph-captured hybrid step (no paging, no scheduler), ctx 1024.
PROBE_HYBRID = {16: [(11.8, 21700, "C=256"), (29.9, 34300, "C=1024"), (117.0, 34900, "C=2048-4096")],
                64: [(14.7, 17400, "C=256"), (20.9, 24400, "C=512"), (63.0, 32400, "C=2048-4096")]}

COMMAND = ("bash bench/gpu_session.sh frontier-hybrid|frontier-rapid  (rapid bench frontier --model /tmp/llama8b "
           "--load-format dummy --ctx 1024 --prefill-len 2048 --window-s 2 --max-model-len 4096)")


def frontier() -> None:
    points, seen = [], set()
    for name, note in FRONTIER_SOURCES:
        for p in json.loads((R / name).read_text()):
            # hybrid: both code versions are kept (session 10's small chunks came out slower, cause unknown)
            key = (p["mode"], p.get("chunk") or p.get("split"), p["batch"], name if p["mode"] == "hybrid" else "")
            if key in seen:
                continue  # a newer session measured this point with the final code
            seen.add(key)
            points.append({**p, "code": note, "source": name})
    out = {"command": COMMAND, "device": DEVICE, "model": MODEL,
           "tpot": "start-to-start time of consecutive decode steps of the batch, host gaps included",
           "reference_plain_pytorch_hybrid": PROBE_HYBRID, "points": points}
    (R / "frontier-h100.json").write_text(json.dumps(out, indent=1))
    for batch in (16, 64, 256):
        series = {}
        for p in points:
            if p["batch"] != batch:
                continue
            label = f"C={p['chunk']}" if p["mode"] == "hybrid" else p["split"]
            name = f"{p['mode']} (engine, {p['source'].split('/')[0]})" if p["mode"] == "hybrid" else "rapid (engine)"
            series.setdefault(name, []).append((p["tpot_mean_ms"], p["prefill_tok_s"], label))
        if batch in PROBE_HYBRID:
            series["ideal hybrid (plain-PyTorch probe)"] = PROBE_HYBRID[batch]
        for s in series.values():
            s.sort()
        plot_frontier(series, R / f"frontier-h100-b{batch}.png",
                      title=f"Decode batch {batch}, ctx 1024: TPOT vs prefill tok/s (H100, 8B shapes)")
    lines = ["# TPOT against prefill throughput, through the engine's own workers (H100)", "",
             f"Device: {DEVICE}. Model: {MODEL}. Command: `{COMMAND}`.",
             "Decode: B requests with 1024-token prompts decoding; prefill: 2048-token prompts kept queued "
             "(max_tokens=1). TPOT = mean start-to-start decode step time in a 2 s window (p90 beside it).", "",
             "| mode | setting | batch | decode alone (ms) | TPOT mean / p90 (ms) | prefill tok/s | decode idle gap (ms) | hand-off (ms) | code |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["batch"], p["mode"], p["tpot_mean_ms"])):
        setting = f"chunk {p['chunk']}" if p["mode"] == "hybrid" else f"MPS {p['split']}"
        lines.append(f"| {p['mode']} | {setting} | {p['batch']} | {p['decode_alone_ms']} | {p['tpot_mean_ms']} / "
                     f"{p['tpot_p90_ms']} | {p['prefill_tok_s']:.0f} | {p['idle_gap_median_ms'] or '-'} | "
                     f"{p['handoff_median_ms'] or '-'} | {p['code']} |")
    lines += ["", "Plain-PyTorch ideal hybrid (GPU_NOTES.md, one graph-captured step, no engine): "
              + "; ".join(f"batch {b}: " + ", ".join(f"{c} {t} ms / {r/1000:.1f}k" for t, r, c in v) for b, v in PROBE_HYBRID.items()),
              "", "Plots: frontier-h100-b16.png, frontier-h100-b64.png, frontier-h100-b256.png."]
    (R / "frontier-h100.md").write_text("\n".join(lines) + "\n")


SERVE_SESSION = "session9"  # 400 prompts, 8-96 req/s, flash prefill (session7: same with cuDNN prefill)


def serve() -> None:
    modes, att = {}, {"1000/50": {}, "500/25": {}}
    for mode in ("hybrid", "rapid"):
        data = json.loads((R / f"{SERVE_SESSION}/serve-{mode}-flash/serve.json").read_text())
        entry = data["modes"][mode]
        modes[mode] = {"command": data["command"], "per_rate": []}
        for rate in entry["per_rate"]:
            recs = [RequestRecord(prompt_len=a, output_len=b, ttft=c, latency=d, success=e)
                    for a, b, c, d, e, *_ in rate["records"]]  # newer files add the arrival time
            row = {k: v for k, v in rate.items() if k != "records"}
            for slo, (t, p) in (("1000/50", (1000, 50)), ("500/25", (500, 25))):
                a = slo_attainment(recs, t, p)
                row[f"attainment_{slo}"] = a
                att[slo].setdefault(mode, []).append((rate["request_rate"], a))
            modes[mode]["per_rate"].append(row)
    goodput = {slo: {m: goodput_rate([r for r, _ in v], [a for _, a in v]).__dict__ for m, v in d.items()}
               for slo, d in att.items()}
    out = {"device": DEVICE, "model": MODEL, "dataset": "sharegpt-like (lognormal lengths, rapid.bench.datasets), "
           "400 prompts, outputs capped at 512 tokens, Poisson arrivals", "modes": modes, "goodput": goodput}
    (R / "serve-h100.json").write_text(json.dumps(out, indent=1, default=str))
    plot_attainment(att["1000/50"], R / "attainment-h100.png", title="SLO attainment, TTFT 1 s / TPOT 50 ms (H100)")
    plot_attainment(att["500/25"], R / "attainment-h100-tight.png",
                    title="SLO attainment, TTFT 500 ms / TPOT 25 ms (H100)")
    lines = ["# Serving: hybrid vs rapid on one H100 (trace replay)", "",
             f"Device: {DEVICE}. Model: {MODEL}. {out['dataset']}. rapid: MPS 60/40; both: 2048-token prefill budget.", "",
             "| mode | rate (req/s) | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | output tok/s | attainment 1s/50ms | attainment 500ms/25ms |",
             "|---|---|---|---|---|---|---|"]
    for mode, e in modes.items():
        for r in e["per_rate"]:
            lines.append(f"| {mode} | {r['request_rate']:g} | {r['median_ttft_ms']:.1f} / {r['p90_ttft_ms']:.1f} | "
                         f"{r['median_tpot_ms']:.1f} / {r['p90_tpot_ms']:.1f} | {r['output_throughput']:.0f} | "
                         f"{r['attainment_1000/50']:.2f} | {r['attainment_500/25']:.2f} |")
    lines += ["", "Goodput per GPU (highest rate with >= 90% attainment, interpolated between measured rates):", ""]
    for slo, d in goodput.items():
        lines.append(f"- {slo}: " + ", ".join(
            f"{m} {g['rate']:.1f} req/s" + (" (lower bound)" if g.get("is_lower_bound") else "")
            + (" (below the lowest rate)" if g.get("below_range") else "") for m, g in d.items()))
    lines += ["", f"Raw: `{SERVE_SESSION}/serve-{{hybrid,rapid}}-flash/serve.json` (per-request records included)."]
    (R / "serve-h100.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    frontier()
    serve()
    print("wrote", sorted(p.name for p in R.glob("*-h100*")))

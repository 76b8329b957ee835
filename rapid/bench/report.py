"""What `rapid bench serve` writes besides its JSON: a markdown table and PNG plots (when matplotlib is
installed; without it the plots are skipped with one line naming the ``bench`` extra)."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["write_markdown", "write_plots", "PLOTS_SKIPPED"]

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _verdict(st: dict) -> str:
    if st["stable"] is None:
        return "n/a: " + "; ".join(st["reasons"])
    return "stable" if st["stable"] else "**UNSTABLE**: " + "; ".join(st["reasons"])


def _busy_share(device_time: dict) -> float | None:
    """The decode worker's stream: busy / (busy + idle) over its decode, mixed and inline steps."""
    kinds = [device_time[k] for k in ("decode", "mixed", "inline") if k in device_time]
    busy, idle = sum(t["busy_s"] for t in kinds), sum(t["idle_s"] for t in kinds)
    return busy / (busy + idle) if busy + idle > 0 else None


def _goodput_text(g: dict | None, unit: str = "GPU") -> str:
    if g is None:
        return "not measured"
    if g["below_range"]:
        text = "below the lowest stable rate measured (or no stable rate)"
    else:
        text = (f"{g['rate']:.2f} req/s ({g['rate_per_gpu']:.2f} per {unit})"
                + (" or more" if g["is_lower_bound"] else ""))
    if g["upper_bound"] is not None:
        text += f", < {g['upper_bound']:g} req/s (unstable there)"
    return text


def _mode_lines(mode: str, e: dict, pairs: list[str], has_slos: bool, unit: str) -> list[str]:
    lines = [f"## {mode} ({e['num_gpus']} {unit})", "",
             "| rate (req/s) | offered / served (req/s) | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | E2E p50 / p99 (ms) | output tok/s | measured (failed) | "
             + ("attainment | " if has_slos else "") + "".join(f"{p} | " for p in pairs) + "verdict |",
             "|" + "---|" * (9 + has_slos + len(pairs))]
    for r in e["per_rate"]:
        cells = [f"{r['request_rate']:g}", f"{_f(r['offered_rate'], '.2f')} / {_f(r['served_rate'], '.2f')}"]
        for m in ("ttft", "tpot", "itl", "e2el"):
            cells.append(f"{r[f'median_{m}_ms']:.1f} / {r[f'p99_{m}_ms']:.1f}")
        cells += [f"{r['output_throughput']:.0f}", f"{r['completed'] + r['failed']} ({r['failed']})"]
        if has_slos:
            cells.append(_f(r.get("slo_attainment"), ".3f"))
        cells += [_f(r["attainment"].get(p), ".3f") for p in pairs]
        cells.append(_verdict(r["stability"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    placed = [(r["request_rate"], r["engine"]) for r in e["per_rate"] if r.get("engine")]
    if placed:  # where the prompts ran (in-process runs record the engine's counters)
        two = any(g["prefill_tokens_by_lane"].get("prefill2") for _, g in placed)
        lanes = ("decode", "prefill", "prefill2") if two else ("decode", "prefill")
        lines.append(f"- placement ({placed[0][1]['placement_policy']}): prompt tokens on the decode lane (mixed "
                     f"steps) / the prefill worker{' / the second prefill worker' if two else ''}, preemptions: "
                     + "; ".join(f"{rate:g} req/s " + " / ".join(f"{g['prefill_tokens_by_lane'].get(lane, 0):,}"
                                                                 for lane in lanes) + f", {g['preemptions']}"
                                 for rate, g in placed))
        reasons = [(rate, g["prefill_batches_by_reason"]) for rate, g in placed
                   if len(g.get("prefill_batches_by_reason") or {}) > 1]
        if reasons:  # a policy with more than one reason: which rule placed the batches
            lines.append("- prefill batches by the placement's lane and reason: " + "; ".join(
                f"{rate:g} req/s " + ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))
                for rate, c in reasons))
        learned = [(rate, g["placement_learned"]) for rate, g in placed if g.get("placement_learned")]
        if learned:
            lines.append("- the placement policy's measured costs at each rate's last arrival (decode step alone / "
                         "beside a prefill batch in ms; us of decode time per prompt token by lane): " + "; ".join(
                             f"{rate:g} req/s " + ", ".join(f"{k} {v:g}" for k, v in c.items()) for rate, c in learned))
        waits = [(rate, g["decode_idle"]) for rate, g in placed if isinstance(g.get("decode_idle"), dict)]
        if waits:
            lines.append("- decode stream's waits for the host over 1 ms (count, seconds, of all its idle seconds): "
                         + "; ".join(f"{rate:g} req/s {d['steps_over_1ms']}, {d['idle_s_over_1ms']:.2f} of "
                                     f"{d['idle_s']:.2f} s" for rate, d in waits))
        batches = [(rate, w) for rate, g in placed if isinstance(w := g.get("prefill_worker"), dict) and "host_ms_median" in w]
        if batches:
            lines.append("- prefill workers per batch, medians (tokens; host ms to enqueue it; ms waiting for it; "
                         "device ms, mean): " + "; ".join(f"{rate:g} req/s {w['tokens_median']}, {w['host_ms_median']:.2f}, "
                                                        f"{w['wait_ms_median']:.1f}, {w['device_ms_mean']:.1f}"
                                                        for rate, w in batches))
        busy = [(rate, _busy_share(g.get("device_time", {}))) for rate, g in placed]
        if any(b is not None for _, b in busy):
            lines.append("- decode worker's device stream busy (its steps' device time over that plus its idle time, "
                         "during the rate and its drain): " + "; ".join(f"{rate:g} req/s {b:.1%}" for rate, b in busy
                                                                        if b is not None))
    if has_slos:
        g = None if "goodput_rps" not in e else {
            "rate": e["goodput_rps"], "rate_per_gpu": e["goodput_rps_per_gpu"],
            "is_lower_bound": e["goodput_is_lower_bound"], "below_range": e["goodput_below_range"],
            "upper_bound": e["goodput_upper_bound_rps"]}
        lines.append(f"- goodput (--goodput SLOs, stable rates only): {_goodput_text(g, unit)}")
    for p in pairs:
        lines.append(f"- goodput TTFT/TPOT {p} ms: {_goodput_text(e['goodput_by_slo'].get(p), unit)}")
    s = e["saturation"]
    if s["request_rate"] is None:
        lines.append("- saturation: no rate was stable" + (f" (first unstable: {s['first_unstable_rate']:g} req/s)"
                                                           if s["first_unstable_rate"] else ""))
    else:
        lines.append(f"- saturation: sustains {s['request_rate']:g} req/s"
                     + (" or more (every measured rate was stable)" if s["is_lower_bound"] else
                        f" (unstable at {s['first_unstable_rate']:g} req/s)")
                     + f", {s['output_throughput']:.0f} output tok/s there")
    return lines + [""]


def write_markdown(summary: dict, path: str | Path) -> Path:
    """serve.md: the method, then per mode a row per rate, the goodput and the saturation point."""
    m = summary["method"]
    pairs = summary.get("slo_pairs", [])
    has_slos = bool(summary.get("slos_ms"))
    lines = [f"# rapid bench serve: {summary['device']}", "", f"Command: `{summary['command']}`", "",
             f"Method: {m['duration_text']}; warm-up {m['warmup_text']}: requests arriving in it are excluded. "
             f"Arrivals: {m['arrivals']}. Dataset: {m['dataset']}. Each rate gets fresh prompts (seeds "
             f"{m['seeds']}; first KV blocks shared with an earlier rate: {m['shared_first_blocks']}). "
             f"Throughputs count what was served inside the window; latencies are over the measured requests. "
             f"{m['stability_rule']}", ""]
    if has_slos:
        lines += [f"SLOs (--goodput): {', '.join(f'{k} {v:g} ms' for k, v in summary['slos_ms'].items())}; "
                  "goodput = highest stable rate with >= 90% attainment, interpolated between measured rates.", ""]
    for mode, e in summary["modes"].items():
        lines += _mode_lines(mode, e, pairs, has_slos, summary.get("accelerator") or "GPU")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(summary: dict, out_dir: str | Path) -> list[Path] | str:
    """attainment.png (per SLO), ttft.png, tpot.png with unstable rates crossed out; without matplotlib
    nothing is drawn and :data:`PLOTS_SKIPPED` is returned."""
    if not _matplotlib_available():
        return PLOTS_SKIPPED
    from rapid.bench.plots import plot_attainment, plot_latency_percentiles

    out_dir = Path(out_dir)
    modes = summary["modes"]
    finite = {m: [p for p in e["per_rate"] if math.isfinite(p["request_rate"])] for m, e in modes.items()}
    unstable = {m: [p["request_rate"] for p in ps if p["stability"]["stable"] is False] for m, ps in finite.items()}
    written = []
    slos = summary.get("slos_ms") or {}
    slo_text = ", ".join(f"{k.upper()} {v:g} ms" for k, v in slos.items())
    series = {"attainment": (lambda p: p.get("slo_attainment"), slo_text)}
    series.update({f"attainment-{k.replace('/', '-')}": (lambda p, k=k: p["attainment"].get(k), f"TTFT/TPOT {k} ms")
                   for k in summary.get("slo_pairs", [])})
    for name, (get, text) in series.items():
        att = {m: [(p["request_rate"], get(p)) for p in ps if get(p) is not None] for m, ps in finite.items()}
        if any(att.values()):
            written.append(plot_attainment(att, out_dir / f"{name}.png", title=f"SLO attainment ({text})",
                                           unstable=unstable))
    lat = {m: [(p["request_rate"], p) for p in ps] for m, ps in finite.items()}
    if any(lat.values()):
        for metric in ("ttft", "tpot"):
            written.append(plot_latency_percentiles(lat, out_dir / f"{metric}.png", metric=metric,
                                                    slo_ms=slos.get(metric), unstable=unstable,
                                                    log_y=metric == "ttft"))
    return written

"""The JSON of `rapid bench serve`: one entry per measured rate, one summary per mode.

A rate's entry holds vllm's metric names (``completed``, ``request_throughput``,
``output_throughput``, ``mean/median/std/p50/p90/p99_{ttft,tpot,itl,e2el}_ms``, ``request_goodput``)
computed over the MEASURED requests (arrived after the warm-up), with the throughputs taken inside
the measurement window (:mod:`rapid.bench.steady`; ``request_goodput`` = served rate x the share of
measured requests meeting the --goodput SLOs), plus ``offered_rate``, ``served_rate``,
``slo_attainment`` (the --goodput SLOs), ``attainment`` per TTFT/TPOT pair and ``stability``.
A mode's summary holds the goodput (stable rates only) per SLO and the saturation point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rapid.bench.metrics import RequestRecord, compute_metrics, goodput_per_gpu, slo_attainment
from rapid.bench.steady import StabilityCriteria, measured, saturation, stability, stable_goodput, window_throughput

__all__ = ["parse_slo_pairs", "pair_key", "rate_result", "mode_summary"]


def parse_slo_pairs(spec: str | None) -> list[tuple[float, float]]:
    """``"1000/50,500/25"`` -> [(1000.0, 50.0), (500.0, 25.0)]: TTFT ms / TPOT ms pairs."""
    pairs = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            ttft, tpot = (float(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(f"SLO pair {item!r} is not TTFT_MS/TPOT_MS (e.g. 1000/50)") from None
        if not (ttft > 0 and tpot > 0):
            raise ValueError(f"SLO pair {item!r}: both values must be > 0 ms, got {ttft:g} and {tpot:g}")
        pairs.append((ttft, tpot))
    return pairs


def pair_key(pair: tuple[float, float]) -> str:
    return f"{pair[0]:g}/{pair[1]:g}"


def rate_result(records: Sequence[RequestRecord], rate: float, duration_s: float, warmup_s: float, wall_s: float,
                slos: Mapping[str, float], slo_pairs: Sequence[tuple[float, float]] = (),
                criteria: StabilityCriteria = StabilityCriteria()) -> dict:
    """Everything the JSON says about one rate (a burst, rate inf, is measured whole over its wall time)."""
    if math.isinf(rate):
        meas = list(records)
        metrics = compute_metrics(meas, wall_s, slos or None)
        extra = {"offered_rate": None, "served_rate": metrics["request_throughput"],
                 "stability": {"stable": None, "reasons": ["burst (rate inf): no steady state to judge"]}}
    else:
        meas = measured(records, warmup_s, duration_s)
        tput = window_throughput(records, warmup_s, duration_s)
        metrics = compute_metrics(meas, tput["window_s"], slos or None)
        metrics["duration"] = tput["window_s"]
        metrics["request_throughput"] = tput["served_rate"]
        metrics["output_throughput"] = tput["output_throughput"]
        metrics["total_token_throughput"] = tput["total_token_throughput"]
        extra = {"offered_rate": tput["offered_rate"], "served_rate": tput["served_rate"],
                 "stability": stability(records, warmup_s, duration_s, criteria)}
    out = {"request_rate": rate, "duration_s": duration_s, "warmup_s": warmup_s, "wall_s": wall_s,
           "num_prompts": len(records), "excluded_warmup": len(records) - len(meas), **metrics, **extra}
    if slos and meas:
        out["slo_attainment"] = slo_attainment(meas, slos.get("ttft"), slos.get("tpot"), e2el_ms=slos.get("e2el"))
        if math.isfinite(rate):  # the served rate times the share meeting the SLOs (never above the throughput)
            out["request_goodput"] = out["served_rate"] * out["slo_attainment"]
    elif slos:
        out["slo_attainment"] = None
    out["attainment"] = {pair_key(p): slo_attainment(meas, *p) if meas else None for p in slo_pairs}
    out["records"] = [[r.prompt_len, r.output_len, r.ttft, r.latency, r.success, r.arrival_time] for r in records]
    return out


def _goodput_entry(per_rate: Sequence[dict], attainment_of, num_gpus: int) -> dict | None:
    rows = [(p["request_rate"], attainment_of(p), p["stability"]["stable"]) for p in per_rate
            if math.isfinite(p["request_rate"]) and attainment_of(p) is not None]
    if not rows:
        return None
    g = stable_goodput([r for r, _, _ in rows], [a for _, a, _ in rows], [s for _, _, s in rows])
    g["rate_per_gpu"] = goodput_per_gpu(g["rate"], num_gpus)
    return g


def mode_summary(per_rate: Sequence[dict], num_gpus: int, slo_pairs: Sequence[tuple[float, float]] = ()) -> dict:
    """Goodput from the stable rates (the --goodput SLOs, then each pair) and the saturation point."""
    entry: dict = {"per_rate": list(per_rate), "num_gpus": num_gpus}
    g = _goodput_entry(per_rate, lambda p: p.get("slo_attainment"), num_gpus)
    if g is not None:
        entry.update({"goodput_rps": g["rate"], "goodput_rps_per_gpu": g["rate_per_gpu"],
                      "goodput_is_lower_bound": g["is_lower_bound"], "goodput_below_range": g["below_range"],
                      "goodput_upper_bound_rps": g["upper_bound"], "goodput_rates_used": g["rates_used"]})
    entry["goodput_by_slo"] = {pair_key(pr): _goodput_entry(per_rate, lambda p, k=pair_key(pr): p["attainment"].get(k),
                                                            num_gpus) for pr in slo_pairs}
    finite = [p for p in per_rate if math.isfinite(p["request_rate"])]
    entry["saturation"] = saturation([p["request_rate"] for p in finite], [p["stability"]["stable"] for p in finite],
                                     [p["output_throughput"] for p in finite])
    return entry

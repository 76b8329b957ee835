"""Serving-benchmark metrics with ``vllm bench serve``'s definitions and key names.

Per-request measurements go into :class:`RequestRecord`; :func:`compute_metrics` turns a
list of them into the same dict of aggregates that ``vllm bench serve`` writes to its result
JSON. SLO attainment and DistServe-style goodput (the highest request rate at which a target
share of requests meets the SLOs) are computed by :func:`slo_attainment` and
:func:`goodput_rate`.

Units: every time in a :class:`RequestRecord` is in **seconds**; every SLO and every ``*_ms``
metric is in **milliseconds**.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SLO_KEYS",
    "LATENCY_METRICS",
    "RequestRecord",
    "GoodputResult",
    "compute_metrics",
    "percentile_key",
    "parse_goodput",
    "slo_attainment",
    "goodput_rate",
    "goodput_per_gpu",
]

#: SLO names accepted by :func:`parse_goodput` (vllm's ``--goodput`` keys), values in ms.
SLO_KEYS = ("ttft", "tpot", "e2el")
#: Latency metrics reported by :func:`compute_metrics`, in vllm's order.
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")

_MS_PER_S = 1000.0


@dataclass(kw_only=True)
class RequestRecord:
    """What the driver measured for one request (all times in seconds).

    Attributes:
        prompt_len: Prompt length in tokens.
        output_len: Number of output tokens actually generated (0 for a failed request).
        arrival_time: Scheduled arrival, seconds from the start of the run.
        start_time: When the request was actually submitted, seconds from the start of the run.
        ttft: Time to first token: submission to first output token.
        itl: Gaps between consecutive output tokens (``output_len - 1`` values when each token
            is delivered separately; fewer if the engine delivers tokens in chunks).
        latency: End-to-end latency: submission to last output token.
        success: False if the request failed; failed requests count only in ``failed`` and
            as SLO misses.
        error: The failure message, if any.
    """

    prompt_len: int
    output_len: int
    arrival_time: float = 0.0
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    success: bool = True
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: ``(latency - ttft) / (output_len - 1)``.

        ``None`` when ``output_len <= 1`` (undefined) or the request failed.
        """
        if not self.success or self.output_len <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class GoodputResult:
    """Result of :func:`goodput_rate`.

    Attributes:
        rate: Estimated goodput in requests/s (``float(result)`` gives it too).
        is_lower_bound: Attainment never fell below the target over the measured rates, so
            ``rate`` is the highest measured rate and the true goodput is at least that.
        below_range: Even the lowest measured rate missed the target; ``rate`` is 0.0 and the
            true goodput lies somewhere in ``[0, min(rates))``: measure lower rates.
    """

    rate: float
    is_lower_bound: bool = False
    below_range: bool = False

    def __float__(self) -> float:
        return self.rate


# --------------------------------------------------------------------------------------------
# SLO parsing


def parse_goodput(spec: str | Iterable[str]) -> dict[str, float]:
    """Parse SLOs given as ``"ttft:1000 tpot:50"`` or ``["ttft:1000", "tpot:50"]``.

    Pairs in a string are separated by whitespace or commas. Keys are ``ttft``, ``tpot`` and
    ``e2el`` (case-insensitive); values are milliseconds.

    Raises:
        ValueError: empty spec, a pair not of the form ``key:value``, an unknown or repeated
            key, or a value that is not a positive finite number.
    """
    items = re.split(r"[\s,]+", spec.strip()) if isinstance(spec, str) else list(spec)
    items = [item for item in items if item]
    if not items:
        raise ValueError("no SLO given; expected pairs like 'ttft:1000 tpot:50' (ms)")
    slos: dict[str, float] = {}
    for item in items:
        if not isinstance(item, str) or item.count(":") != 1:
            raise ValueError(f"SLO {item!r} is not of the form 'key:value' (value in ms)")
        key, raw = (part.strip() for part in item.split(":"))
        key = key.lower()
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO key {key!r}; expected one of {', '.join(SLO_KEYS)}")
        if key in slos:
            raise ValueError(f"SLO key {key!r} given twice")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"SLO {item!r}: {raw!r} is not a number (ms)") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"SLO {item!r}: value must be a positive finite number of ms")
        slos[key] = value
    return slos


def _validated_slos(slos: Mapping[str, float] | str | Iterable[str]) -> dict[str, float]:
    if isinstance(slos, Mapping):
        return parse_goodput([f"{key}:{value}" for key, value in slos.items()])
    return parse_goodput(slos)


# --------------------------------------------------------------------------------------------
# aggregate metrics


def percentile_key(metric: str, p: float) -> str:
    """vllm's result key for a percentile: ``percentile_key("ttft", 99) == "p99_ttft_ms"``,
    ``percentile_key("itl", 99.9) == "p99.9_itl_ms"``."""
    p_word = str(int(p)) if int(p) == p else str(p)
    return f"p{p_word}_{metric}_ms"


def _latency_stats(
    metric: str, values_s: Sequence[float], percentiles: Sequence[float]
) -> dict[str, float]:
    """mean/median/std/percentiles in ms; like vllm, an empty list reports zeros."""
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64)
    stats = {
        f"mean_{metric}_ms": float(np.mean(arr)) * _MS_PER_S,
        f"median_{metric}_ms": float(np.median(arr)) * _MS_PER_S,
        f"std_{metric}_ms": float(np.std(arr)) * _MS_PER_S,
    }
    for p in percentiles:
        stats[percentile_key(metric, p)] = float(np.percentile(arr, p)) * _MS_PER_S
    return stats


def _meets_slos(record: RequestRecord, slos_s: Mapping[str, float]) -> bool:
    """Whether a request meets every SLO (in seconds); failures never do.

    TPOT of a request with at most one output token counts as 0 (only TTFT and E2EL can be
    missed), as in vllm.
    """
    if not record.success:
        return False
    measured = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}
    return all(measured[key] <= limit for key, limit in slos_s.items())


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    goodput_slos: Mapping[str, float] | str | Iterable[str] | None = None,
    percentiles: Sequence[float] = (50, 90, 99),
) -> dict[str, Any]:
    """Aggregate metrics of one benchmark run, with ``vllm bench serve``'s result keys.

    Definitions (as in vllm's ``calculate_metrics``): only successful requests contribute to
    tokens, throughputs and latencies. TTFT and E2EL (``latency``) are per request; TPOT is
    ``(latency - ttft) / (output_len - 1)`` over requests with ``output_len > 1``; ITL pools
    every inter-token gap of every request. Throughputs divide by ``duration_s`` (the wall time
    of the whole run). ``request_goodput`` is the number of successful requests meeting all of
    ``goodput_slos`` per second (a request with one output token has TPOT 0 there); it is
    ``None`` when no SLOs are given. A metric with no samples reports 0.0, as vllm does.

    Args:
        records: One record per request sent.
        duration_s: Benchmark wall time in seconds (> 0).
        goodput_slos: SLOs in ms, as a dict (``{"ttft": 1000, "tpot": 50}``) or anything
            :func:`parse_goodput` accepts; ``None`` for none.
        percentiles: Percentiles to report for every latency metric (0..100).

    Returns:
        A dict with, in this order: ``duration``, ``completed``, ``failed``,
        ``total_input_tokens``, ``total_output_tokens``, ``request_throughput``,
        ``request_goodput``, ``output_throughput``, ``total_token_throughput``, then for each
        of ``ttft``, ``tpot``, ``itl``, ``e2el``: ``mean_<m>_ms``, ``median_<m>_ms``,
        ``std_<m>_ms`` and ``p<P>_<m>_ms`` for each requested percentile (see
        :func:`percentile_key`). Token counts are ints, everything else float.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be positive and finite, got {duration_s}")
    for p in percentiles:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is outside [0, 100]")
    slos_s = (
        None
        if goodput_slos is None
        else {k: v / _MS_PER_S for k, v in _validated_slos(goodput_slos).items()}
    )

    done = [r for r in records if r.success]
    total_input = sum(int(r.prompt_len) for r in done)
    total_output = sum(int(r.output_len) for r in done)
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }

    result: dict[str, Any] = {
        "duration": float(duration_s),
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "request_goodput": (
            None if slos_s is None else sum(_meets_slos(r, slos_s) for r in done) / duration_s
        ),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for metric in LATENCY_METRICS:
        result.update(_latency_stats(metric, samples[metric], percentiles))
    return result


# --------------------------------------------------------------------------------------------
# SLO attainment and goodput


def slo_attainment(
    records: Sequence[RequestRecord],
    ttft_ms: float | None,
    tpot_ms: float | None,
    *,
    e2el_ms: float | None = None,
) -> float:
    """Share of ALL requests that succeeded and met every given SLO (0.0 .. 1.0).

    Failed requests count as misses. A request with a single output token is judged on TTFT
    (and E2EL if given) only: its TPOT is undefined. An SLO given as ``None`` is not checked.
    Comparisons are ``<=`` (meeting the SLO exactly counts), as in vllm's goodput.

    Raises:
        ValueError: no records, or an SLO that is not positive.
    """
    if not records:
        raise ValueError("SLO attainment of an empty list of requests is undefined")
    given = {"ttft": ttft_ms, "tpot": tpot_ms, "e2el": e2el_ms}
    slos_s: dict[str, float] = {}
    for key, value in given.items():
        if value is None:
            continue
        if not value > 0:
            raise ValueError(f"{key} SLO must be > 0 ms, got {value}")
        slos_s[key] = value / _MS_PER_S
    met = sum(_meets_slos(r, slos_s) for r in records)
    return met / len(records)


def goodput_rate(
    rates: Sequence[float], attainments: Sequence[float], target: float = 0.9
) -> GoodputResult:
    """DistServe-style goodput: the highest request rate whose SLO attainment is >= ``target``.

    The measurements are sorted by rate. Scanning upward, let ``(r_hi, a_hi)`` be the
    measurement just before the first one whose attainment falls below the target, and
    ``(r_lo, a_lo)`` that first one. The goodput is the linear interpolation of the crossing,
    ``r_hi + (a_hi - target) / (a_hi - a_lo) * (r_lo - r_hi)``. For rates [1, 2, 3, 4] with
    attainment [1.0, 0.95, 0.85, 0.5]: ``2 + (0.95 - 0.9) / (0.95 - 0.85) * 1 = 2.5``.

    Choices:

    * The FIRST downward crossing counts; a later recovery above the target (noise at high
      rate) does not raise the goodput.
    * If the attainment never falls below the target, the result is the highest measured rate
      with ``is_lower_bound=True``.
    * If even the lowest measured rate misses, the result is 0.0 with ``below_range=True``. We
      do not interpolate from an assumed (0 req/s, 100%) point: a system can miss an SLO that
      is tighter than its unloaded latency at any rate, so that point is not known to hold.

    Raises:
        ValueError: empty or mismatched inputs, repeated or non-positive/non-finite rates,
            attainments outside [0, 1], or a target outside (0, 1].
    """
    if len(rates) != len(attainments):
        raise ValueError(f"{len(rates)} rates but {len(attainments)} attainments")
    if not rates:
        raise ValueError("goodput needs at least one (rate, attainment) measurement")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    points = sorted(zip((float(r) for r in rates), (float(a) for a in attainments)))
    for rate, att in points:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rates must be positive and finite, got {rate}")
        if not 0 <= att <= 1:
            raise ValueError(f"attainment must be in [0, 1], got {att}")
    sorted_rates = [rate for rate, _ in points]
    if len(set(sorted_rates)) != len(sorted_rates):
        raise ValueError("each rate may be measured only once; average repeats first")

    for i, (r_lo, a_lo) in enumerate(points):
        if a_lo >= target:
            continue
        if i == 0:
            return GoodputResult(0.0, below_range=True)
        r_hi, a_hi = points[i - 1]
        return GoodputResult(r_hi + (a_hi - target) / (a_hi - a_lo) * (r_lo - r_hi))
    return GoodputResult(points[-1][0], is_lower_bound=True)


def goodput_per_gpu(rate: float | GoodputResult, num_gpus: int) -> float:
    """Goodput normalised per GPU: ``rate / num_gpus`` (req/s/GPU), for comparing systems that
    use different numbers of GPUs (DistServe reports per-GPU goodput)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive int, got {num_gpus!r}")
    return float(rate) / num_gpus

"""Steady-state reading of one serving run: the measurement window, window throughputs, the
stability verdict, and goodput / saturation over the stable rates only.

A run at rate ``r`` sends requests from time 0 until ``end_s`` (the duration). Requests that
ARRIVE before ``warmup_s`` are excluded from the statistics (the engine and its queues are still
filling); the measurement window is ``[warmup_s, end_s]``.

Throughputs are what the engine delivered INSIDE the window, so a queue left to drain after the
arrivals stop does not count (that was the 3x overstatement of burst replays):

* ``served_rate``: requests (any) that finished inside the window, per second of window;
* ``output_throughput``: output tokens produced inside the window, per second of window;
* ``offered_rate``: arrivals in the window, per second;
* ``expected_rate``: what a server that kept up would finish inside the window: every request
  finishing at its own start + the run's mean TTFT + the run's mean time per output token x its
  own output length, per second. Comparing the served count with this (rather than with arrivals
  shifted by one latency) cancels the noise of random output lengths and of arrival rates that
  drift within a short window; a server falling behind finishes late requests later than the
  means say, so it still shows a shortfall.

A rate is UNSTABLE (the queue keeps growing) when any of these holds:

* TTFT trend: the least-squares slope of TTFT against arrival time exceeds ``max_ttft_slope``
  (0.05 s/s). A queue that grows by a fraction f of the arrival rate adds about f seconds of
  waiting per second of arrivals, so 0.05 means "more than 5% overloaded";
* TTFT growth: the last third's median TTFT (by arrival) is ``max_ttft_growth`` (3x) times the
  first third's and at least ``min_ttft_rise_s`` (0.25 s) above it;
* shortfall: the served rate is more than ``max_shortfall`` (5%) below the expected rate, and by at
  least ``min_shortfall_requests`` (3) requests over the window (catches overload that shows up as
  slower decoding rather than queueing before prefill);
* unfinished: measured requests were still running at the drain deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from rapid.bench.metrics import GoodputResult, RequestRecord, goodput_rate

__all__ = ["UNFINISHED", "StabilityCriteria", "measured", "window_throughput", "stability",
           "stable_goodput", "saturation"]

#: error of a request still running at the drain deadline (it was aborted).
UNFINISHED = "unfinished at the drain deadline (aborted)"
_EPS = 1e-6  # the last arrival is rescaled onto the duration: float rounding may put it a hair past


@dataclass(frozen=True)
class StabilityCriteria:
    max_ttft_slope: float = 0.05  # seconds of TTFT per second of arrival time
    max_ttft_growth: float = 3.0  # last third's median TTFT / first third's
    min_ttft_rise_s: float = 0.25  # ... and at least this many seconds higher
    max_shortfall: float = 0.05  # served rate below the expected rate by more than this fraction ...
    min_shortfall_requests: int = 3  # ... and by at least this many requests (one late request is no trend)
    min_requests: int = 6  # fewer measured requests: no verdict

    def __post_init__(self) -> None:
        for name in ("max_ttft_slope", "max_ttft_growth", "max_shortfall"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_requests < 3:
            raise ValueError(f"min_requests must be >= 3, got {self.min_requests}")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"A rate is unstable (its queue grows) when TTFT rises more than {self.max_ttft_slope:g} s per s of "
                f"arrival time (least squares), or the last third's median TTFT is >= {self.max_ttft_growth:g}x the "
                f"first third's and {self.min_ttft_rise_s:g} s above it, or the served rate is more than "
                f"{self.max_shortfall:.0%} (and {self.min_shortfall_requests} requests) below what a server keeping "
                "up would finish in the window (each request's own output length at the run's mean TTFT and time "
                "per output token), or "
                "measured requests were still running at the drain deadline; unstable rates count neither for "
                "goodput nor for saturation.")


def _check_window(warmup_s: float, end_s: float) -> None:
    if not (0 <= warmup_s < end_s and math.isfinite(end_s)):
        raise ValueError(f"the window needs 0 <= warmup_s < end_s (finite), got warmup_s={warmup_s}, end_s={end_s}")


def measured(records: Sequence[RequestRecord], warmup_s: float, end_s: float) -> list[RequestRecord]:
    """The requests that count: those that ARRIVED in ``[warmup_s, end_s]``."""
    _check_window(warmup_s, end_s)
    return [r for r in records if warmup_s <= r.arrival_time <= end_s + _EPS]


def _finish_time(r: RequestRecord) -> float:
    return r.start_time + r.latency


def _tokens_in(r: RequestRecord, lo: float, hi: float) -> float:
    """Output tokens of ``r`` produced in ``[lo, hi]``: token times are start + TTFT + cumulative ITL;
    when the deltas carried several tokens per gap (fewer gaps than tokens) each time is scaled up."""
    if not r.success or r.output_len <= 0:
        return 0.0
    times = r.start_time + r.ttft + np.concatenate(([0.0], np.cumsum(r.itl, dtype=np.float64)))
    inside = int(np.count_nonzero((times >= lo) & (times <= hi)))
    return inside * r.output_len / len(times)


def _expected_finishes(records: Sequence[RequestRecord], meas: Sequence[RequestRecord], lo: float, hi: float) -> int:
    """Requests a server holding the measured mean TTFT and time per output token would finish in [lo, hi]."""
    if not meas:
        return 0
    ttft = float(np.mean([r.ttft for r in meas]))
    gaps = sum(max(r.output_len - 1, 0) for r in meas)
    per_token = sum(r.latency - r.ttft for r in meas) / gaps if gaps else 0.0
    finish = [r.start_time + ttft + per_token * max(r.output_len - 1, 0) for r in records if r.success]
    return sum(lo <= f <= hi for f in finish)


def window_throughput(records: Sequence[RequestRecord], warmup_s: float, end_s: float) -> dict[str, float]:
    """Rates inside the window (see the module docstring), from every request of the run."""
    _check_window(warmup_s, end_s)
    width = end_s - warmup_s
    arrived = measured(records, warmup_s, end_s)
    meas = [r for r in arrived if r.success]
    served = [r for r in records if r.success and warmup_s <= _finish_time(r) <= end_s]
    out_tokens = sum(_tokens_in(r, warmup_s, end_s) for r in records)
    in_tokens = sum(r.prompt_len for r in served)
    return {"window_s": width, "offered_rate": len(arrived) / width, "served_rate": len(served) / width,
            "expected_rate": _expected_finishes(records, meas, warmup_s, end_s) / width,
            "output_throughput": out_tokens / width, "total_token_throughput": (in_tokens + out_tokens) / width}


def _median(xs: Sequence[float]) -> float:
    return float(np.median(xs))


def stability(records: Sequence[RequestRecord], warmup_s: float, end_s: float,
              criteria: StabilityCriteria = StabilityCriteria()) -> dict:
    """Verdict for one rate: ``{"stable": True | False | None, "reasons": [...], <the statistics>}``.

    ``stable`` is None (no verdict) when fewer than ``criteria.min_requests`` requests were measured."""
    meas = measured(records, warmup_s, end_s)
    unfinished = sum(r.error == UNFINISHED for r in meas)
    ok = sorted((r for r in meas if r.success), key=lambda r: r.arrival_time)
    tput = window_throughput(records, warmup_s, end_s)
    out: dict = {"stable": None, "reasons": [], "measured_requests": len(meas), "unfinished": unfinished,
                 "ttft_slope": None, "ttft_growth": None, "ttft_median_first_third_ms": None,
                 "ttft_median_last_third_ms": None, "offered_rate": tput["offered_rate"],
                 "served_rate": tput["served_rate"], "expected_rate": tput["expected_rate"], "shortfall": None}
    if len(meas) < criteria.min_requests:
        out["reasons"].append(f"only {len(meas)} requests measured (< {criteria.min_requests}): no verdict")
        return out
    reasons = []
    if unfinished:
        reasons.append(f"{unfinished} of {len(meas)} measured requests were still running at the drain deadline")
    if len(ok) >= 3:
        t = np.array([r.arrival_time for r in ok])
        y = np.array([r.ttft for r in ok])
        if np.ptp(t) > 0:
            slope = float(np.polyfit(t, y, 1)[0])
            out["ttft_slope"] = slope
            if slope > criteria.max_ttft_slope:
                reasons.append(f"TTFT rises {slope:.3f} s per s of arrivals (> {criteria.max_ttft_slope:g}): "
                               "the queue grows")
        third = max(1, len(ok) // 3)
        first, last = _median(y[:third]), _median(y[-third:])
        out["ttft_median_first_third_ms"], out["ttft_median_last_third_ms"] = first * 1000, last * 1000
        growth = last / first if first > 0 else math.inf
        out["ttft_growth"] = growth if math.isfinite(growth) else None
        if growth >= criteria.max_ttft_growth and last - first >= criteria.min_ttft_rise_s:
            reasons.append(f"median TTFT of the last third {last * 1000:.0f} ms is {growth:.1f}x the first third's "
                           f"{first * 1000:.0f} ms (>= {criteria.max_ttft_growth:g}x and "
                           f"+{criteria.min_ttft_rise_s:g} s)")
    if tput["expected_rate"] > 0:
        shortfall = 1 - tput["served_rate"] / tput["expected_rate"]
        out["shortfall"] = shortfall
        missing = (tput["expected_rate"] - tput["served_rate"]) * tput["window_s"]
        if shortfall > criteria.max_shortfall and missing >= criteria.min_shortfall_requests - _EPS:
            reasons.append(f"served {tput['served_rate']:.2f} req/s, {shortfall:.0%} below the "
                           f"{tput['expected_rate']:.2f} req/s a server keeping up would finish "
                           f"(> {criteria.max_shortfall:.0%})")
    out["stable"] = not reasons
    out["reasons"] = reasons
    return out


def stable_goodput(rates: Sequence[float], attainments: Sequence[float], stable: Sequence[bool | None],
                   target: float = 0.9) -> dict:
    """Goodput (as :func:`rapid.bench.metrics.goodput_rate`) from the stable rates below the lowest
    unstable one: an unstable rate's attainment is a transient (its queue grows without bound), so it
    is no measurement; the lowest unstable rate bounds the goodput from above instead. Rates without a
    verdict (None) are left out too."""
    if not len(rates) == len(attainments) == len(stable):
        raise ValueError(f"{len(rates)} rates, {len(attainments)} attainments, {len(stable)} verdicts")
    unstable = [r for r, s in zip(rates, stable) if s is False]
    ceiling = min(unstable) if unstable else None
    points = [(r, a) for r, a, s in zip(rates, attainments, stable)
              if s is True and (ceiling is None or r < ceiling)]
    if points:
        g = goodput_rate([r for r, _ in points], [a for _, a in points], target)
    else:
        g = GoodputResult(0.0, below_range=True)
    return {"rate": g.rate, "is_lower_bound": g.is_lower_bound, "below_range": g.below_range,
            "upper_bound": ceiling, "rates_used": [r for r, _ in points]}


def saturation(rates: Sequence[float], stable: Sequence[bool | None], output_throughputs: Sequence[float]) -> dict:
    """The highest rate sustained (stable, below the lowest unstable one) and its output tokens/s.

    ``is_lower_bound``: every measured rate was stable, so the engine sustains at least this rate."""
    unstable = [r for r, s in zip(rates, stable) if s is False]
    ceiling = min(unstable) if unstable else math.inf
    ok = [(r, t) for r, s, t in zip(rates, stable, output_throughputs) if s is True and r < ceiling]
    if not ok:
        return {"request_rate": None, "output_throughput": None, "is_lower_bound": False,
                "first_unstable_rate": None if math.isinf(ceiling) else ceiling}
    rate, tput = max(ok)
    return {"request_rate": rate, "output_throughput": tput, "is_lower_bound": math.isinf(ceiling),
            "first_unstable_rate": None if math.isinf(ceiling) else ceiling}

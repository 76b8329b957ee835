"""Serving benchmark building blocks in the manner of ``vllm bench serve``.

* :mod:`rapid.bench.datasets` -- request generators (random, ShareGPT file, ShareGPT-like).
* :mod:`rapid.bench.arrivals` -- Poisson / gamma request arrival times.
* :mod:`rapid.bench.metrics` -- per-request records, vllm-compatible aggregate metrics,
  SLO attainment and DistServe-style goodput.
* :mod:`rapid.bench.steady` -- the steady-state window, stability verdict, goodput over stable rates
  and the saturation point.
* :mod:`rapid.bench.traces` -- per-rate plans and fresh traces (no prompt shared between rates).
* :mod:`rapid.bench.plots` -- PNG plots (matplotlib is imported only when a plot is drawn).
"""

from rapid.bench.arrivals import arrival_times
from rapid.bench.datasets import (
    SampleRequest,
    random_requests,
    sharegpt_like_requests,
    sharegpt_requests,
)
from rapid.bench.metrics import (
    GoodputResult,
    RequestRecord,
    compute_metrics,
    goodput_per_gpu,
    goodput_rate,
    parse_goodput,
    percentile_key,
    slo_attainment,
)
from rapid.bench.plots import plot_attainment, plot_frontier, plot_latency_percentiles
from rapid.bench.steady import StabilityCriteria, saturation, stability, stable_goodput, window_throughput

__all__ = [
    "SampleRequest",
    "random_requests",
    "sharegpt_requests",
    "sharegpt_like_requests",
    "arrival_times",
    "RequestRecord",
    "GoodputResult",
    "compute_metrics",
    "percentile_key",
    "parse_goodput",
    "slo_attainment",
    "goodput_rate",
    "goodput_per_gpu",
    "plot_attainment",
    "plot_latency_percentiles",
    "plot_frontier",
    "StabilityCriteria",
    "stability",
    "stable_goodput",
    "saturation",
    "window_throughput",
]

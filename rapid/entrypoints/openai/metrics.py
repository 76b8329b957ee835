"""Prometheus metrics of the HTTP server, named as vLLM's `vllm:*` with the prefix `rapid:`.

Each server owns its registry (no global state). Request metrics are observed from the deltas of every request
through the server's engine frontend (its own, and those of a ZeroMQ server sharing it), on the frontend's engine
loop from the moment a request reaches the engine (one still queued in the frontend is not yet waiting). Engine
metrics (KV usage, preemptions) come from a stats callable asked at most once per `stats_interval_s` at scrape time
(it is a round trip to the engine core in multi-process modes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rapid.core.placement import LANES
from rapid.protocol.engine import RequestDelta, Stats

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class _EngineStatsCollector:
    """rapid:kv_cache_usage_perc and rapid:num_preemptions from the engine's Stats (cached)."""

    def __init__(self, get_stats: Callable[[], Stats], labels: dict[str, str], interval_s: float):
        self.get_stats, self.labels, self.interval_s = get_stats, labels, interval_s
        self._cached: Stats | None = None
        self._at = float("-inf")

    def _stats(self) -> Stats | None:
        if time.monotonic() - self._at >= self.interval_s:
            self._at = time.monotonic()
            try:
                self._cached = self.get_stats()
            except Exception as e:  # a dead engine still lets /metrics answer
                logger.warning("engine stats unavailable: %s", e)
                self._cached = None
        return self._cached

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        names, values = list(self.labels), list(self.labels.values())
        kv = GaugeMetricFamily("rapid:kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.",
                               labels=names)
        used = 1.0 - stats.num_free_blocks / stats.num_blocks if stats.num_blocks else 0.0
        kv.add_metric(values, used)
        yield kv
        pre = CounterMetricFamily("rapid:num_preemptions", "Cumulative number of preemptions by the scheduler.",
                                  labels=names)
        pre.add_metric(values, stats.num_preemptions)
        yield pre
        lane = GaugeMetricFamily("rapid:prefill_placement", "Where the latest prefill batch ran (value 1): lane "
                                 "'decode' (hybrid batching), 'prefill' (the prefill worker, concurrently) or "
                                 "'prefill2' (the second prefill worker, at its own SM share).",
                                 labels=names + ["policy", "lane"])
        tokens = CounterMetricFamily("rapid:prefill_placed_tokens", "Prompt tokens placed on each lane.",
                                     labels=names + ["lane"])
        for name in LANES:
            lane.add_metric(values + [stats.placement_policy, name], float(stats.placement == name))
            tokens.add_metric(values + [name], stats.prefill_tokens_by_lane.get(name, 0))
        yield lane
        yield tokens
        cost = GaugeMetricFamily("rapid:placement_cost_us_per_prompt_token", "What the adaptive placement has "
                                 "measured one prompt token to cost the running decodes on each lane (us of decode "
                                 "time); absent until measured.", labels=names + ["lane"])
        for key, value in stats.placement_learned.items():
            if key.startswith("decode_us_per_prompt_token:"):
                cost.add_metric(values + [key.split(":", 1)[1]], value)
        yield cost
        eager = CounterMetricFamily("rapid:eager_steps", "Steps that ran outside their worker's CUDA graphs although "
                                    "it captured some (no graph fits the batch), by step kind.", labels=names + ["kind"])
        for kind, steps in stats.eager_steps.items():
            eager.add_metric(values + [kind], steps)
        yield eager


class ServerMetrics:
    """The registry and the metrics of one server; `track()` follows one engine request."""

    def __init__(self, model_name: str, mode: str, get_stats: Callable[[], Stats] | None = None,
                 stats_interval_s: float = 1.0, placement: str = ""):
        """`placement`: the name of the engine's placement policy (rapid.core.adaptive.make_placement)."""
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        r = self.registry
        self.ttft = Histogram("rapid:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              names, registry=r, buckets=LATENCY_BUCKETS).labels(**self.labels)
        self.itl = Histogram("rapid:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             names, registry=r, buckets=LATENCY_BUCKETS).labels(**self.labels)
        self.e2e = Histogram("rapid:e2e_request_latency_seconds", "Histogram of end-to-end request latency in "
                             "seconds.", names, registry=r, buckets=LATENCY_BUCKETS).labels(**self.labels)
        self.running = Gauge("rapid:num_requests_running", "Requests producing tokens.", names,
                             registry=r).labels(**self.labels)
        self.waiting = Gauge("rapid:num_requests_waiting", "Requests waiting for their first token.", names,
                             registry=r).labels(**self.labels)
        self.prompt_tokens = Counter("rapid:prompt_tokens", "Prefill tokens processed.", names,
                                     registry=r).labels(**self.labels)
        self.generation_tokens = Counter("rapid:generation_tokens", "Generation tokens produced.", names,
                                         registry=r).labels(**self.labels)
        self.cache_queries = Counter("rapid:prefix_cache_queries", "Prefix-cache queries, in prompt tokens.",
                                     names, registry=r).labels(**self.labels)
        self.cache_hits = Counter("rapid:prefix_cache_hits", "Prefix-cache hits, in prompt tokens.", names,
                                  registry=r).labels(**self.labels)
        self.success = Counter("rapid:request_success", "Finished requests, by finish reason.",
                               names + ["finished_reason"], registry=r)
        info = Gauge("rapid:engine_info", "The engine's mode and prefill placement (value 1).",
                     names + ["mode", "placement"], registry=r)
        info.labels(**self.labels, mode=mode, placement=placement).set(1)
        if get_stats is not None:
            r.register(_EngineStatsCollector(get_stats, self.labels, stats_interval_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int) -> "RequestTracker":
        return RequestTracker(self, num_prompt_tokens)


class RequestTracker:
    """One engine request's metrics, fed every delta (EngineFrontend.observe_requests); it closes on the last."""

    def __init__(self, m: ServerMetrics, num_prompt_tokens: int):
        self.m, self.num_prompt_tokens = m, num_prompt_tokens
        self.started = False
        self.closed = False
        self.last_token_time: float | None = None
        self.arrival = time.time()
        m.waiting.inc()

    def on_delta(self, d: RequestDelta) -> None:
        if self.closed:
            return
        if d.arrival_time:
            self.arrival = d.arrival_time
        n = len(d.new_token_ids)
        if n:
            self.m.generation_tokens.inc(n)
            now = d.last_token_time or time.time()
            if not self.started:
                self.started = True
                self.m.waiting.dec()
                self.m.running.inc()
                self.m.ttft.observe(max((d.first_token_time or now) - self.arrival, 0.0))
                self.m.cache_queries.inc(self.num_prompt_tokens)
                self.m.cache_hits.inc(min(d.num_cached_tokens, self.num_prompt_tokens))
                self.m.prompt_tokens.inc(self.num_prompt_tokens)
                n -= 1
            if n and self.last_token_time is not None:
                gap = max(now - self.last_token_time, 0.0) / n
                for _ in range(n):
                    self.m.itl.observe(gap)
            self.last_token_time = now
        if d.finished or d.error is not None:
            self.close("error" if d.error is not None else d.finish_reason or "stop")

    def close(self, finished_reason: str = "abort") -> None:
        """The request ended (by default: aborted, e.g. its client went away)."""
        if self.closed:
            return
        self.closed = True
        self.m.success.labels(**self.m.labels, finished_reason=finished_reason).inc()
        self.m.e2e.observe(max(time.time() - self.arrival, 0.0))
        (self.m.running if self.started else self.m.waiting).dec()

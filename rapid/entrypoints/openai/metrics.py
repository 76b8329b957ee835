"""Prometheus metrics of the HTTP server, named as vLLM's `vllm:*` with the prefix `rapid:`.

Each server owns its registry (no global state). Request metrics are observed from the deltas of every request
through the server's engine frontend (its own, and those of a ZeroMQ server sharing it), on the frontend's engine
loop from the moment a request reaches the engine (one still queued in the frontend is not yet waiting). As vLLM's,
a request is waiting until the scheduler first puts it in a batch (RequestDelta.first_scheduled_time), running from
then on (prefilling included), and waiting again while it is preempted (RequestDelta.preempted: from the preemption
until a batch takes it again, as vLLM's scheduler puts it back in its waiting queue); its per-request histograms
(phases, tokens, params) are observed when it ends. Engine metrics (KV usage, preemptions, placement, eager steps) come from a stats callable
asked at most once per `stats_interval_s` at scrape time (it is a round trip to the engine core in multi-process
modes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rapid.core.placement import LANES
from rapid.params import SamplingParams
from rapid.protocol.engine import RequestDelta, Stats

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
PHASE_BUCKETS = LATENCY_BUCKETS + (160.0, 320.0, 640.0, 1280.0, 2560.0, 7680.0)  # a request's queue, prefill...
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's for request_params_n
FINISHED_REASONS = ("stop", "length", "abort", "error")  # rapid:request_success's label values


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 buckets up to max_model_len: 1, 2, 5, 10, 20, 50, 100, ..."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class _EngineStatsCollector:
    """Every metric read from the engine's Stats (cached): KV usage, preemptions, the prefill placement and its
    learned costs, eager steps."""

    def __init__(self, get_stats: Callable[[], Stats], labels: dict[str, str], interval_s: float):
        self.get_stats, self.labels, self.interval_s = get_stats, labels, interval_s
        self._cached: Stats | None = None
        self._at = float("-inf")

    def _stats(self) -> Stats | None:
        if time.monotonic() - self._at >= self.interval_s:
            self._at = time.monotonic()
            try:
                self._cached = self.get_stats()
            except TimeoutError:  # the engine loop is inside a long step: the last figures stand meanwhile
                logger.debug("engine stats not ready: /metrics keeps the previous ones")
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
                 stats_interval_s: float = 1.0, placement: str = "", max_model_len: int = 1 << 20):
        """`placement`: the name of the engine's placement policy (rapid.core.adaptive.make_placement);
        `max_model_len`: where the token histograms' buckets stop."""
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
        self.running = Gauge("rapid:num_requests_running", "Requests scheduled (prefilling or decoding).", names,
                             registry=r).labels(**self.labels)
        self.waiting = Gauge("rapid:num_requests_waiting", "Requests in the engine not yet scheduled.", names,
                             registry=r).labels(**self.labels)
        self.requests = RequestHistograms(r, self.labels, max_model_len)
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
        for reason in FINISHED_REASONS:  # every series from the start, at 0, as vLLM's (rate() and absent() see them)
            self.success.labels(**self.labels, finished_reason=reason)
        info = Gauge("rapid:engine_info", "The engine's mode and prefill placement (value 1).",
                     names + ["mode", "placement"], registry=r)
        info.labels(**self.labels, mode=mode, placement=placement).set(1)
        if get_stats is not None:
            r.register(_EngineStatsCollector(get_stats, self.labels, stats_interval_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int, params: SamplingParams | None = None) -> "RequestTracker":
        """Follow one engine request (an EngineFrontend observer factory)."""
        return RequestTracker(self, num_prompt_tokens, None if params is None else params.max_tokens)

    def observe_request_n(self, n: int) -> None:
        """rapid:request_params_n: one prompt of an HTTP request asked for `n` choices (n engine requests)."""
        self.requests.params_n.observe(n)


class RequestHistograms:
    """vLLM's per-request histograms, each observed once per request when it ends (request_params_n: per prompt
    of an HTTP request, when it is submitted)."""

    def __init__(self, r: CollectorRegistry, labels: dict[str, str], max_model_len: int):
        names, tokens = list(labels), token_buckets(max_model_len)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"rapid:{name}", doc, names, registry=r, buckets=buckets).labels(**labels)

        self.queue_time = histogram("request_queue_time_seconds", "Histogram of time spent waiting (arrival in the "
                                    "engine to first scheduled) in seconds.", PHASE_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Histogram of time spent in prefill (first "
                                      "scheduled to first token) in seconds.", PHASE_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Histogram of time spent in decode (first "
                                     "token to last token) in seconds.", PHASE_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "Histogram of time spent running (first "
                                        "scheduled to last token) in seconds.", PHASE_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "Histogram of each request's mean time per "
                              "output token after the first (decode time / (tokens - 1); 0 for one token) in "
                              "seconds.", LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Histogram of prompt tokens per request.", tokens)
        self.generation_tokens = histogram("request_generation_tokens", "Histogram of generated tokens per "
                                           "request.", tokens)
        self.max_tokens = histogram("request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                    tokens)
        self.params_n = histogram("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)


class RequestTracker:
    """One engine request's metrics, fed every delta (EngineFrontend.observe_requests); it closes on the last."""

    def __init__(self, m: ServerMetrics, num_prompt_tokens: int, max_tokens: int | None = None):
        self.m, self.num_prompt_tokens, self.max_tokens = m, num_prompt_tokens, max_tokens
        self.running = False  # counted in num_requests_running (else in num_requests_waiting)
        self.started = False  # its first token came
        self.closed = False
        self.scheduled_time = 0.0  # first scheduled (0: not yet, or an engine that does not say)
        self.first_token_time = 0.0
        self.last_token_time: float | None = None
        self.num_generated = 0
        self.arrival = time.time()
        m.waiting.inc()

    def _run(self, running: bool = True) -> None:
        """Count the request running (False: waiting, e.g. preempted)."""
        if self.running != running:
            self.running = running
            (self.m.waiting if running else self.m.running).dec()
            (self.m.running if running else self.m.waiting).inc()

    def on_delta(self, d: RequestDelta) -> None:
        if self.closed:
            return
        if d.arrival_time:
            self.arrival = d.arrival_time
        if d.first_scheduled_time and not self.scheduled_time:
            self.scheduled_time = d.first_scheduled_time
            self._run()
        n = len(d.new_token_ids)
        if n:
            self.m.generation_tokens.inc(n)
            self.num_generated += n
            now = d.last_token_time or time.time()
            if not self.started:
                self.started = True
                self._run()  # (already, unless the engine did not say when it scheduled the request)
                self.first_token_time = d.first_token_time or now
                self.m.ttft.observe(max(self.first_token_time - self.arrival, 0.0))
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
        elif d.preempted or self.scheduled_time:  # (its output above came before the preemption)
            self._run(not d.preempted)

    def close(self, finished_reason: str = "abort") -> None:
        """The request ended (by default: aborted, e.g. its client went away)."""
        if self.closed:
            return
        self.closed = True
        m, h = self.m, self.m.requests
        m.success.labels(**m.labels, finished_reason=finished_reason).inc()
        m.e2e.observe(max(time.time() - self.arrival, 0.0))
        (m.running if self.running else m.waiting).dec()
        h.prompt_tokens.observe(self.num_prompt_tokens)
        h.generation_tokens.observe(self.num_generated)
        if self.max_tokens is not None:
            h.max_tokens.observe(self.max_tokens)
        # the phases it went through, as vLLM's (whose intervals end at the last token, not at the finish)
        scheduled = self.scheduled_time
        if scheduled:
            h.queue_time.observe(max(scheduled - self.arrival, 0.0))
        if self.started:
            last = self.last_token_time or self.first_token_time
            decode = max(last - self.first_token_time, 0.0)
            h.decode_time.observe(decode)
            h.tpot.observe(decode / (self.num_generated - 1) if self.num_generated > 1 else 0.0)
            if scheduled:
                h.prefill_time.observe(max(self.first_token_time - scheduled, 0.0))
                h.inference_time.observe(max(last - scheduled, 0.0))

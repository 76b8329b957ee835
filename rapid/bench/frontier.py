"""The central experiment, through the engine's own workers: decode step time (TPOT) against the prefill
tokens/s obtained at the same time, for hybrid (decode batch + a prefill chunk per step) and rapid
(prefill worker beside decode worker, MPS split p/d).

Procedure per point: B decode requests (prompt of `ctx` random tokens, long outputs, ignore_eos) reach
steady decode; then prefill-only requests (`prefill_len` tokens, max_tokens=1, so they never join the
decode batch) are kept queued for `window_s` seconds. TPOT = decode step intervals with batch B inside
the window, start to start (mean, median, p90); prefill tokens/s = tokens prefilled inside the window / window length.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from rapid.bench.offline import device_time_during, prefill_worker_batches
from rapid.protocol.engine import AddRequest
from rapid.params import SamplingParams


def _pump(client, seconds: float, on_finished=None) -> None:
    """Drive the engine (hybrid steps run inside get_deltas) and react to finished requests."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for d in client.get_deltas(timeout_s=0.05):
            if d.error:
                raise RuntimeError(d.error)
            if d.finished and on_finished is not None:
                on_finished(d.request_id)


def _window(intervals, values, t0, t1, want=None):
    out = []
    for (a, b), v in zip(intervals, values):
        if a >= t0 and b <= t1 and (want is None or v == want):
            out.append((a, b, v))
    return out


def start_steady_decode(llm, batch: int, ctx: int, seed: int, rng: random.Random, poll_s: float = 0.5,
                        temperature: float = 0.0, seeded: bool = False) -> list[str]:
    """Add `batch` requests with `ctx`-token prompts drawn from rng (greedy unless `temperature`; a seed per request
    if `seeded`; ignore_eos, as long as the context allows) and drive the engine until it decodes them all in one
    step; returns their ids."""
    client = llm.engine
    vocab = llm.model_config.vocab_size
    max_len = llm.config.scheduler.max_model_len
    decode_ids = [f"d{seed}-{i}" for i in range(batch)]
    for rid in decode_ids:
        params = SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=max_len - ctx - 1,
                                seed=rng.randrange(2**31) if seeded else None)
        prompt = [rng.randrange(vocab) for _ in range(ctx)]
        client.add_request(AddRequest(rid, prompt, params, arrival_time=time.time()))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _pump(client, poll_s)
        s = client.get_stats()
        if s.decode_batch_sizes and s.decode_batch_sizes[-1] == batch:
            break
    return decode_ids


def step_periods(stats, t0: float, t1: float, batch: int) -> list[float]:
    """Start-to-start intervals (s) of the decode steps of `batch` rows inside [t0, t1]."""
    starts = [a for a, _, _ in _window(stats.decode_intervals, stats.decode_batch_sizes, t0, t1, batch)]
    return [b - a for a, b in zip(starts, starts[1:])]


def measure_point(llm, batch: int, ctx: int, prefill_len: int, window_s: float, queued_prefills: int = 2,
                  seed: int = 0, step_budget: int | None = None) -> dict:
    """hybrid: `step_budget` (decodes + chunk) applies from steady decode on; the B contexts are prefilled
    with the engine's whole token budget first (with B + C per step, filling batch 256 takes minutes)."""
    client = llm.engine
    vocab = llm.model_config.vocab_size
    rng = random.Random(seed)
    decode_ids = start_steady_decode(llm, batch, ctx, seed, rng)
    if step_budget is not None:
        client.set_token_budget(step_budget)
    t_alone = time.time()
    _pump(client, min(2.0, window_s))
    alone = client.get_stats()
    alone_steps = step_periods(alone, t_alone, time.time(), batch)

    counter = iter(range(10**9))
    live: set[str] = set()

    def add_prefill():
        rid = f"p{seed}-{next(counter)}"
        live.add(rid)
        client.add_request(AddRequest(rid, [rng.randrange(vocab) for _ in range(prefill_len)],
                                      SamplingParams(temperature=0, max_tokens=1), arrival_time=time.time()))

    def on_finished(rid):
        if rid in live:
            live.discard(rid)
            add_prefill()

    for _ in range(queued_prefills):
        add_prefill()
    _pump(client, min(1.0, window_s), on_finished)  # let the prefill stream reach steady state
    device_before = client.get_stats().device_time
    t0 = time.time()
    _pump(client, window_s, on_finished)
    t1 = time.time()
    s = client.get_stats()
    client.abort(decode_ids + sorted(live))
    _pump(client, 1.0)
    # TPOT = start-to-start time of consecutive decode steps: host gaps between steps count, in both modes.
    steps = step_periods(s, t0, t1, batch)
    prefill_tokens = sum(v for _, _, v in _window(s.prefill_intervals, s.prefill_tokens, t0, t1))
    steps_ms = sorted(x * 1e3 for x in steps)
    return {
        "batch": batch, "ctx": ctx, "prefill_len": prefill_len, "window_s": round(t1 - t0, 3),
        "decode_alone_ms": round(statistics.median(alone_steps) * 1e3, 3) if alone_steps else None,
        "tpot_mean_ms": round(statistics.fmean(steps_ms), 3) if steps_ms else None,
        "tpot_median_ms": round(statistics.median(steps_ms), 3) if steps_ms else None,
        "tpot_p90_ms": round(steps_ms[int(0.9 * (len(steps_ms) - 1))], 3) if steps_ms else None,
        "decode_steps": len(steps_ms),
        "prefill_tok_s": round(prefill_tokens / (t1 - t0), 1),
        "idle_gap_median_ms": round(statistics.median(s.decode_idle_gaps_s) * 1e3, 4) if s.decode_idle_gaps_s else None,
        "handoff_median_ms": round(statistics.median(s.handoff_s) * 1e3, 3) if s.handoff_s else None,
        # rapid's prefill worker: host time to enqueue a batch, and its wait since its previous one
        **prefill_worker_times(s, t0, t1),
        # device time per step kind in the window (rapid.worker.device_timer): steps, busy_s, idle_s per stream
        "device_time": device_time_during(device_before, s.device_time),
    }


def prefill_worker_times(s, t0: float, t1: float) -> dict:
    """Medians over the prefill workers' batches in the window (a mixed step reports no host time): the host time
    to enqueue a batch and the worker's wait since its previous batch (with one prefill worker kept busy, the core's
    round trip); None without such batches."""
    pairs = [(h, gap) for (a, b), h, gap, _ in prefill_worker_batches(s) if a >= t0 and b <= t1]

    def median_ms(values):
        return round(statistics.median(values) * 1e3, 4) if values else None

    return {"prefill_host_median_ms": median_ms([h for h, _ in pairs]),
            "prefill_idle_gap_median_ms": median_ms([g for _, g in pairs])}


def run_frontier(model: str, mode: str, settings: list, batches: list[int], ctx: int, prefill_len: int,
                 window_s: float, out_path: str | None = None, max_model_len: int = 4096, **engine_kwargs) -> list[dict]:
    """hybrid: settings are chunk sizes C (step budget = B + C); rapid: (prefill %, decode %) MPS splits."""
    from rapid import LLM

    results = []
    # room for the decode batch plus the queued prefill-only requests
    common = dict(max_model_len=max_model_len, max_num_seqs=max(batches) + 4, skip_tokenizer_init=True, **engine_kwargs)
    if mode == "hybrid":
        with LLM(model, mode="hybrid", max_num_batched_tokens=max(batches) + max(settings), **common) as llm:
            for b in batches:
                for c in settings:
                    llm.engine.set_token_budget(llm.config.scheduler.max_num_batched_tokens)
                    point = measure_point(llm, b, ctx, prefill_len, window_s, seed=len(results), step_budget=b + c)
                    results.append({"mode": "hybrid", "chunk": c, **point})
                    _emit(results, out_path)
    else:
        for p, d in settings:
            # static placement: every prompt on the prefill worker at this split, the lever under measurement
            with LLM(model, mode="rapid", max_num_batched_tokens=prefill_len, prefill_sm_percentage=p,
                     decode_sm_percentage=d, placement="static", **common) as llm:
                for b in batches:
                    point = measure_point(llm, b, ctx, prefill_len, window_s, seed=len(results))
                    results.append({"mode": "rapid", "split": f"{p}/{d}", **point})
                    _emit(results, out_path)
    return results


def _emit(results: list[dict], out_path: str | None) -> None:
    """Print the newest point and rewrite the JSON file (a run cut short keeps what it measured)."""
    print(json.dumps(results[-1]), flush=True)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(results, indent=1))

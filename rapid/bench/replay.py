"""Replay one trace against an in-process engine (``llm.engine``), recording what a client sees.

Each request is sent at its arrival time; TTFT, inter-token gaps and E2E latency are taken from the
output deltas as they arrive, with TTFT and E2E counted from the SCHEDULED arrival (with an in-process
hybrid engine, --no-engine-process, the engine steps in this thread, so a send made late by a long step is
the engine's delay, as a real client would see it). Requests still running ``drain_timeout_s`` after the
last arrival are aborted and recorded as failed (:data:`rapid.bench.steady.UNFINISHED`): an overloaded rate
must not hold the benchmark hostage while its queue drains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from rapid.bench.datasets import SampleRequest
from rapid.bench.metrics import RequestRecord
from rapid.bench.steady import UNFINISHED
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest

__all__ = ["replay_inproc"]

ABORT_GRACE_S = 30.0  # after aborting, how long to wait for the engine's finished deltas


def replay_inproc(llm, trace: Sequence[SampleRequest], arrivals: Sequence[float], ignore_eos: bool, *,
                  cap: int | None = None, tag: str = "", drain_timeout_s: float | None = None,
                  at_last_arrival: Callable[[], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``trace[i]`` at ``arrivals[i]`` (seconds from the start); return the records and the wall time.
    `at_last_arrival` is called once, right after the last request was sent (before the queue drains)."""
    if len(trace) != len(arrivals):
        raise ValueError(f"{len(trace)} requests but {len(arrivals)} arrival times")
    client = llm.engine
    records: dict[str, RequestRecord] = {}
    sent_at: dict[str, float] = {}
    last_token: dict[str, float] = {}
    pending: set[str] = set()
    deadline = (arrivals[-1] + drain_timeout_s) if (drain_timeout_s is not None and len(arrivals)) else None
    aborted_at = None
    next_i = 0
    bar = tqdm(total=len(trace), desc=tag, leave=False)
    start = time.perf_counter()
    while next_i < len(trace) or pending:
        now = time.perf_counter() - start
        while next_i < len(trace) and arrivals[next_i] <= now:
            req = trace[next_i]
            rid = f"{tag}-{next_i}"
            out_len = min(req.output_len, cap) if cap else req.output_len
            ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else llm.tokenizer.encode(req.prompt)
            at = float(arrivals[next_i])
            records[rid] = RequestRecord(prompt_len=len(ids), output_len=0, arrival_time=at, start_time=at)
            sent_at[rid] = start + at  # the clock starts at the scheduled arrival (see the module docstring)
            try:
                params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=ignore_eos)
                client.add_request(AddRequest(rid, ids, params, arrival_time=time.time()))
                pending.add(rid)
            except ValueError as e:
                records[rid].success, records[rid].error = False, str(e)
                bar.update(1)
            next_i += 1
            if next_i == len(trace) and at_last_arrival is not None:
                at_last_arrival()
        if deadline is not None and aborted_at is None and pending and now > deadline:
            aborted_at = now
            for rid in pending:
                records[rid].success, records[rid].error = False, UNFINISHED
            client.abort(sorted(pending))
        if aborted_at is not None and now > aborted_at + ABORT_GRACE_S:
            break  # the engine did not confirm the aborts; the records already say unfinished
        wait = 0.0 if next_i >= len(trace) else max(0.0, arrivals[next_i] - (time.perf_counter() - start))
        for d in client.get_deltas(timeout_s=min(wait, 0.01)):
            rec = records.get(d.request_id)
            if rec is None or d.request_id not in pending:
                continue
            t = time.perf_counter()
            if d.new_token_ids and rec.error != UNFINISHED:
                if rec.output_len == 0:
                    rec.ttft = t - sent_at[d.request_id]
                else:
                    gap = t - last_token[d.request_id]
                    rec.itl.extend([gap / len(d.new_token_ids)] * len(d.new_token_ids))
                rec.output_len += len(d.new_token_ids)
                last_token[d.request_id] = t
            if d.finished:
                if rec.error != UNFINISHED:
                    rec.latency = t - sent_at[d.request_id]
                    if d.error:
                        rec.success, rec.error = False, d.error
                pending.discard(d.request_id)
                bar.update(1)
    bar.close()
    return list(records.values()), time.perf_counter() - start

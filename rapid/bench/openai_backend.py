"""Replay one trace against an OpenAI-compatible HTTP server (streaming ``/v1/completions``), with httpx.

Each request is a streamed completion: ``prompt`` is the token ids when the trace has them (else the
text), ``max_tokens`` the output length, greedy, ``stream_options.include_usage`` so the server reports
``completion_tokens`` in a last chunk, and ``return_token_ids`` so a chunk that carries several tokens (a server
sends the tokens that queued up while a stream was behind in one chunk) says how many (``ignore_eos`` is sent when
asked; both are vLLM's and RAPID's extensions).
As in ``vllm bench serve``, every SSE chunk carrying a choice is a token event (TTFT = the first, ITL =
the gaps; a chunk with ``token_ids`` of several tokens spreads its gap over them), a final empty chunk
that only carries the finish reason is not, and the output length is the usage's ``completion_tokens``.
Times count from the scheduled arrival, as in-process. Requests still streaming ``drain_timeout_s``
after the last arrival are cancelled (the connection closes) and recorded as unfinished.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from rapid.bench.datasets import SampleRequest
from rapid.bench.metrics import RequestRecord
from rapid.bench.steady import UNFINISHED

__all__ = ["replay_openai", "completion_payload"]


def completion_payload(req: SampleRequest, model: str, max_tokens: int, ignore_eos: bool) -> dict:
    payload = {"model": model,
               "prompt": list(req.prompt_token_ids) if req.prompt_token_ids is not None else req.prompt,
               "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True},
               "return_token_ids": True}  # vLLM's (and RAPID's): a chunk of several tokens says how many
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _token_event(choice: dict) -> int:
    """How many tokens a streamed choice carries (0: none, e.g. a bare finish-reason chunk)."""
    if "token_ids" in choice:  # the server says (return_token_ids): exact, also for chunks of text held back
        return len(choice["token_ids"] or [])
    if choice.get("text"):
        return 1
    return 0 if choice.get("finish_reason") else 1


async def _one(client, url: str, payload: dict, rec: RequestRecord, t_arrival: float) -> None:
    events = 0
    usage_tokens = None
    last = finish_at = None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:300]
                rec.success, rec.error = False, f"HTTP {resp.status_code}: {body}"
                return
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    rec.success, rec.error = False, str(chunk["error"])[:300]
                    return
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or []
                n = sum(_token_event(c) for c in choices)
                if not n and any(c.get("finish_reason") for c in choices):
                    finish_at = time.perf_counter()  # a last token whose text was all held back arrives here
                if n:
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - t_arrival
                        rec.itl.extend([0.0] * (n - 1))  # tokens that came with the first arrived with it
                    else:
                        rec.itl.extend([(now - last) / n] * n)
                    events += n
                    last = now
        rec.latency = time.perf_counter() - t_arrival
        if finish_at is not None and usage_tokens is not None and events < usage_tokens:
            if last is None:
                rec.ttft = finish_at - t_arrival
            else:
                rec.itl.append(finish_at - last)
            events += 1
        rec.output_len = usage_tokens if usage_tokens is not None else events
        if rec.output_len == 0:
            rec.success, rec.error = False, "the stream carried no tokens"
    except Exception as e:  # noqa: BLE001 -- any transport or protocol failure is this request's failure
        rec.success, rec.error = False, f"{type(e).__name__}: {e}"[:300]


async def _replay(base_url: str, endpoint: str, model: str, trace, arrivals, ignore_eos, cap, drain_timeout_s):
    import httpx

    url = base_url.rstrip("/") + endpoint
    records = [RequestRecord(prompt_len=r.prompt_len, output_len=0, arrival_time=float(a), start_time=float(a))
               for r, a in zip(trace, arrivals)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for req, at, rec in zip(trace, arrivals, records):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            out_len = min(req.output_len, cap) if cap else req.output_len
            payload = completion_payload(req, model, out_len, ignore_eos)
            tasks.append(asyncio.create_task(_one(client, url, payload, rec, start + at)))
        if tasks:
            timeout = None if drain_timeout_s is None else max(0.0, start + arrivals[-1] + drain_timeout_s
                                                               - time.perf_counter())
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
            for task, rec in zip(tasks, records):
                if task in late:
                    rec.success, rec.error = False, UNFINISHED
        return records, time.perf_counter() - start


def replay_openai(base_url: str, trace: Sequence[SampleRequest], arrivals: Sequence[float], ignore_eos: bool, *,
                  model: str, endpoint: str = "/v1/completions", cap: int | None = None,
                  drain_timeout_s: float | None = None) -> tuple[list[RequestRecord], float]:
    """Send ``trace[i]`` at ``arrivals[i]`` to the server; return the records and the wall time."""
    if len(trace) != len(arrivals):
        raise ValueError(f"{len(trace)} requests but {len(arrivals)} arrival times")
    return asyncio.run(_replay(base_url, endpoint, model, list(trace), [float(a) for a in arrivals], ignore_eos,
                               cap, drain_timeout_s))

"""Per-rate traces of `rapid bench serve`: how many prompts, which seed, when they arrive, and prompts
the engine has never seen.

Every rate gets its OWN trace (seed + rate index), so a later rate never hits the prefix cache
filled by an earlier one; the engine warm-up uses the seed after the last rate's. Synthetic datasets (random,
sharegpt-like) draw random token ids, so two traces share a first KV block only by chance
(vocab^-16); a ShareGPT file is drawn once for all rates and split, so no conversation repeats
(two different conversations may still open with the same 16 tokens: counted and reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rapid.bench.arrivals import arrival_times
from rapid.bench.datasets import SampleRequest, random_requests, sharegpt_like_requests, sharegpt_requests

__all__ = ["RatePlan", "default_warmup_s", "plan_rates", "rate_arrivals", "build_traces", "parse_rates",
           "first_blocks", "shared_first_blocks"]

WARMUP_REQUESTS = 4


@dataclass(frozen=True)
class RatePlan:
    """One rate of the sweep: ``num_prompts`` requests arriving over ``duration_s`` (inf rate: a burst)."""

    rate: float
    seed: int
    num_prompts: int
    duration_s: float
    warmup_s: float

    @property
    def steady(self) -> bool:
        return math.isfinite(self.rate)


def default_warmup_s(duration_s: float) -> float:
    """10% of the duration, at least 5 s, but never more than a quarter of it."""
    return min(max(5.0, 0.1 * duration_s), 0.25 * duration_s)


def parse_rates(spec: str) -> list[float]:
    rates = [math.inf if r.strip() == "inf" else float(r) for r in spec.split(",") if r.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--request-rates must be positive numbers or inf, got {spec!r}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"--request-rates repeats a rate: {spec!r}")
    return rates


def plan_rates(rates: Sequence[float], seed: int, duration_s: float | None, num_prompts: int | None = None,
               warmup_s: float | None = None) -> list[RatePlan]:
    """Prompts = rate x duration (or ``num_prompts`` for every rate, then duration = num_prompts / rate);
    seed = seed + rate index. A burst (inf) needs ``num_prompts`` and has no warm-up."""
    if num_prompts is None and (duration_s is None or not duration_s > 0):
        raise ValueError(f"--duration-s must be > 0, got {duration_s}")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    plans = []
    for i, rate in enumerate(rates):
        if math.isinf(rate):
            if num_prompts is None:
                raise ValueError("rate inf (a burst) has no duration: give --num-prompts")
            plans.append(RatePlan(rate, seed + i, num_prompts, 0.0, 0.0))
            continue
        n = num_prompts if num_prompts is not None else max(1, round(rate * duration_s))
        dur = n / rate
        w = default_warmup_s(dur) if warmup_s is None else warmup_s
        if not 0 <= w < dur:
            raise ValueError(f"--warmup-s {w} must be in [0, {dur:g}) (the duration at rate {rate:g})")
        plans.append(RatePlan(rate, seed + i, n, dur, w))
    return plans


def rate_arrivals(plan: RatePlan, burstiness: float) -> np.ndarray:
    """Poisson (gamma) arrivals, rescaled so that the last one is at exactly the duration."""
    return arrival_times(plan.num_prompts, plan.rate, burstiness, plan.seed, normalize_total=True)


def _draw(args, num: int, seed: int, vocab_size: int, max_len: int, tokenizer) -> list[SampleRequest]:
    if args.dataset_name == "random":
        return random_requests(num, args.random_input_len, args.random_output_len, args.random_range_ratio,
                               vocab_size, seed=seed)
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
        if tokenizer is None:
            raise ValueError("the sharegpt dataset needs the model's tokenizer")
        return sharegpt_requests(args.dataset_path, num, tokenizer, seed=seed, max_len=max_len)
    return sharegpt_like_requests(num, vocab_size, seed=seed, max_len=max_len)


def build_traces(args, plans: Sequence[RatePlan], vocab_size: int, max_len: int,
                 tokenizer=None) -> tuple[list[SampleRequest], list[list[SampleRequest]]]:
    """A warm-up trace (a few requests, seed + number of rates) and one fresh trace per plan (see the
    module docstring)."""
    warmup_seed = (plans[0].seed if plans else 0) + len(plans)
    if args.dataset_name != "sharegpt":
        return (_draw(args, WARMUP_REQUESTS, warmup_seed, vocab_size, max_len, tokenizer),
                [_draw(args, p.num_prompts, p.seed, vocab_size, max_len, tokenizer) for p in plans])
    need = sum(p.num_prompts for p in plans) + WARMUP_REQUESTS
    pool = _draw(args, need, plans[0].seed, vocab_size, max_len, tokenizer)
    if len(pool) < need:
        raise ValueError(f"the ShareGPT file holds {len(pool)} usable conversations, fewer than the {need} "
                         "needed (shorten --duration-s or lower the rates)")
    traces, at = [], WARMUP_REQUESTS
    for p in plans:
        traces.append(pool[at: at + p.num_prompts])
        at += p.num_prompts
    return pool[:WARMUP_REQUESTS], traces


def first_blocks(trace: Sequence[SampleRequest], block_size: int = 16, tokenizer=None) -> set[tuple[int, ...]]:
    """The first full KV block of each prompt (prompts shorter than a block fill none and are left out)."""
    out = set()
    for req in trace:
        ids = req.prompt_token_ids
        if ids is None:
            if tokenizer is None:
                continue
            ids = tokenizer.encode(req.prompt)
        if len(ids) >= block_size:
            out.add(tuple(int(t) for t in ids[:block_size]))
    return out


def shared_first_blocks(traces: Sequence[Sequence[SampleRequest]], block_size: int = 16, tokenizer=None) -> int:
    """How many prompts of each trace open with a first block that an EARLIER trace already used."""
    seen: set[tuple[int, ...]] = set()
    shared = 0
    for trace in traces:
        blocks = first_blocks(trace, block_size, tokenizer)
        shared += len(blocks & seen)
        seen |= blocks
    return shared

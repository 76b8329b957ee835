"""`rapid bench offline`: nano-vllm-style throughput (random prompts and lengths, ignore_eos, one warm-up)."""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

from rapid.bench.provenance import provenance


def device_time_during(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, dict]:
    """Steps, busy and idle seconds on the device per step kind (Stats.device_time) between two snapshots.
    Against the elapsed time they say where a run's time went: the decode worker's stream is busy in its
    "decode", "mixed" and "inline" steps and idle otherwise; a prefill worker's ("prefill") beside it."""
    out = {}
    for kind, (steps, busy, idle) in after.items():
        s0, b0, i0 = before.get(kind, (0, 0.0, 0.0))
        if steps > s0:
            out[kind] = {"steps": int(steps - s0), "busy_s": busy - b0, "idle_s": idle - i0}
    return out


def longest_waits(steps: list[tuple[str, float, int, bool]], top: int = 12) -> list[dict]:
    """The longest waits of the decode stream in a run's per-step (kind, idle_s, decode rows, after_idle)
    (Stats.decode_device_idle): index in the run, the kinds before ("start" for the first) and waiting, ms, batch.
    A step after the executor had nothing resident did not wait for the host: left out."""
    waits = [(idle, i, steps[i - 1][0] if i else "start", kind, batch)
             for i, (kind, idle, batch, after_idle) in enumerate(steps) if not after_idle]
    return [{"step": i, "after": prev, "kind": kind, "idle_ms": round(idle * 1e3, 2), "batch": b}
            for idle, i, prev, kind, b in sorted(waits, reverse=True)[:top]]


def decode_idle_during(device_time: dict[str, dict], stats, totals_before: dict) -> dict:
    """Where the decode stream waited during a run: the difference of the engine's running totals by transition
    (Stats.decode_idle_totals, `totals_before` taken before the run: {} when the engine restarted since, its totals
    then the new incarnation's), however long the run. A step after the executor
    had nothing resident counts under "idle -> ..." and in idle_s_without_work, not in the waits (idle_s, over
    1 ms). The longest waits come from the per-step series (Stats.decode_device_idle: the latest STATS_WINDOW steps)
    when it covers the run's decode and mixed steps, counted in `device_time` (device_time_during's result)."""
    totals = stats.decode_idle_totals
    delta = {}
    for key, (n, idle, n_long, idle_long) in totals.items():
        n0, i0, l0, li0 = totals_before.get(key, (0, 0.0, 0, 0.0))
        if n > n0:
            delta[key] = (int(n - n0), idle - i0, int(n_long - l0), idle_long - li0)
    working = [d for key, d in delta.items() if not key.startswith("idle ->")]  # not waits for work to arrive
    out = {"steps": sum(d[0] for d in delta.values()), "idle_s": round(sum(d[1] for d in working), 4),
           "idle_s_without_work": round(sum(d[1] for key, d in delta.items() if key.startswith("idle ->")), 4),
           "by_transition": {k: {"steps": d[0], "idle_s": round(d[1], 4)}
                             for k, d in sorted(delta.items(), key=lambda kv: -kv[1][1])},
           "steps_over_1ms": sum(d[2] for d in working), "idle_s_over_1ms": round(sum(d[3] for d in working), 4)}
    ran = sum(t["steps"] for k, t in device_time.items() if k in ("decode", "mixed"))
    if len(stats.decode_device_idle) >= ran:
        out["longest"] = longest_waits(stats.decode_device_idle[-ran:] if ran else [])
    return out


def prefill_worker_batches(stats) -> list[tuple[tuple[float, float], float, float, int]]:
    """The prefill workers' batches among Stats' prefill series: (interval, host_s, wait_s, tokens). A mixed step's
    prompt part is in the series too, with host time 0: left out."""
    return [(interval, h, gap, n) for interval, h, gap, n in zip(stats.prefill_intervals, stats.prefill_host_s,
                                                                 stats.prefill_idle_gaps_s, stats.prefill_tokens) if h > 0]


def prefill_worker_during(device_time: dict[str, dict], stats) -> dict | None:
    """Per batch of the prefill workers counted in `device_time` (device_time_during's result), medians over the run:
    the host's time to enqueue a batch (forward pass and sampling), the worker's wait since its previous batch (for
    the core's next one), the batch's tokens, and its device time. None in hybrid, where no prefill worker runs."""
    kinds = [k for k in device_time if k.startswith("prefill")]
    ran = sum(device_time[k]["steps"] for k in kinds)
    if not ran:
        return None
    rows = [(h, gap, n) for _, h, gap, n in prefill_worker_batches(stats)][-ran:]
    if len(rows) < ran:
        return {"batches": ran, "recorded": f"not recorded: the engine's stats keep {len(rows)} of {ran} batches"}
    ms = lambda xs, q=0.5: round(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)  # noqa: E731
    busy = sum(device_time[k]["busy_s"] for k in kinds)
    return {"batches": ran, "tokens_median": sorted(n for _, _, n in rows)[len(rows) // 2],
            "host_ms_median": ms([h for h, _, _ in rows]), "host_ms_p90": ms([h for h, _, _ in rows], 0.9),
            "wait_ms_median": ms([g for _, g, _ in rows]), "wait_ms_p90": ms([g for _, g, _ in rows], 0.9),
            "device_ms_mean": round(busy / ran * 1e3, 3)}


def check_lengths(args) -> None:
    """The workload's numbers, before any model loads: ValueError quoting them."""
    if args.num_seqs < 1:
        raise ValueError(f"--num-seqs (--num-prompts) must be >= 1, got {args.num_seqs}")
    for kind in ("input", "output"):
        low, high = getattr(args, f"min_{kind}_len"), getattr(args, f"max_{kind}_len")
        if not 1 <= low <= high:
            raise ValueError(f"--min-{kind}-len and --max-{kind}-len must satisfy 1 <= min <= max, "
                             f"got {low} and {high}")


def run_offline(args) -> dict:
    check_lengths(args)
    import torch

    from rapid import LLM, SamplingParams
    from rapid.config import EngineArgs
    from rapid.worker.gc_heap import startup_heap_frozen

    rng = random.Random(args.seed)
    with LLM.from_engine_args(EngineArgs.from_cli_args(args)) as llm, startup_heap_frozen("rapid bench offline"):
        vocab = llm.model_config.vocab_size
        limit = llm.config.scheduler.max_model_len
        prompts, params = [], []
        for _ in range(args.num_seqs):
            in_len = rng.randint(args.min_input_len, args.max_input_len)
            out_len = rng.randint(args.min_output_len, args.max_output_len)
            if in_len + out_len > limit:  # keep within max_model_len
                out_len = max(1, limit - in_len)
            prompts.append({"prompt_token_ids": [rng.randrange(vocab) for _ in range(in_len)]})
            params.append(SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=out_len, seed=rng.randrange(2**31)))
        llm.generate([{"prompt_token_ids": [rng.randrange(vocab) for _ in range(64)]}], SamplingParams(max_tokens=8),
                     use_tqdm=False)  # warm-up
        start = llm.engine.get_stats()
        before, idle_before = start.device_time, start.decode_idle_totals
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        in_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        device = str(llm.config.device)
        stats = llm.engine.get_stats()
        placed_before = start.prefill_tokens_by_lane  # the warm-up's prompt, left out
        if stats.num_restarts != start.num_restarts:  # the engine restarted: its totals since start are the new one's
            before, idle_before, placed_before = {}, {}, {}
        engine = {"max_num_seqs": llm.config.scheduler.max_num_seqs,  # as fitted to the KV pool when not given
                  "max_num_batched_tokens": llm.config.scheduler.max_num_batched_tokens,
                  "admission_reserve": llm.config.scheduler.admission_reserve,
                  "kv_pool_tokens": llm.engine.num_blocks * llm.config.cache.block_size,
                  "num_preemptions": stats.num_preemptions, "placement_policy": stats.placement_policy,
                  "prefill_tokens_by_lane": {lane: n - placed_before.get(lane, 0)
                                             for lane, n in stats.prefill_tokens_by_lane.items()},
                  "device_time": device_time_during(before, stats.device_time),
                  "eager_steps": stats.eager_steps}  # since start: steps outside the captured graphs, by kind
        engine["decode_idle"] = decode_idle_during(engine["device_time"], stats, idle_before)
        engine["prefill_worker"] = prefill_worker_during(engine["device_time"], stats)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {
        **provenance(args),
        "device": device_name,
        "torch": torch.__version__,
        "mode": args.mode,
        "num_seqs": args.num_seqs,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "elapsed_s": elapsed,
        "output_throughput_tok_s": out_tokens / elapsed,
        "total_throughput_tok_s": (in_tokens + out_tokens) / elapsed,
        "engine": engine,
    }
    path = Path(args.output_json or f"bench/results/offline-{args.mode}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    for kind, t in engine["device_time"].items():
        print(f"  {kind:8s} {t['steps']:6d} steps, {t['busy_s']:7.2f} s busy, {t['idle_s']:6.2f} s idle on its "
              f"device stream ({t['busy_s'] / max(t['steps'], 1) * 1e3:.2f} ms a step)")
    if isinstance(engine.get("decode_idle"), dict):
        d = engine["decode_idle"]
        print(f"  decode stream idle {d['idle_s']:.2f} s, {d['idle_s_over_1ms']:.2f} s of it in {d['steps_over_1ms']} waits "
              f"over 1 ms; by transition: " + ", ".join(f"{k} {v['idle_s']:.2f} s" for k, v in
                                                        list(d["by_transition"].items())[:4]))
    if isinstance(p := engine.get("prefill_worker"), dict) and "host_ms_median" in p:
        print(f"  prefill worker: {p['batches']} batches of {p['tokens_median']} tokens (median): host "
              f"{p['host_ms_median']:.2f} ms (p90 {p['host_ms_p90']:.2f}) to enqueue one, {p['device_ms_mean']:.1f} ms "
              f"on the device, waiting {p['wait_ms_median']:.2f} ms (p90 {p['wait_ms_p90']:.2f}) for the next")
    print(f"Total: {out_tokens} output tokens in {elapsed:.2f}s, {out_tokens / elapsed:.1f} tok/s "
          f"(total {(in_tokens + out_tokens) / elapsed:.1f} tok/s) -> {path}  [device={device}, "
          f"max_num_seqs {engine['max_num_seqs']}, {engine['num_preemptions']} preemptions]")
    return result

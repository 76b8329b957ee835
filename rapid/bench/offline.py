"""`rapid bench offline`: nano-vllm-style throughput (random prompts and lengths, ignore_eos, one warm-up)."""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path


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


def run_offline(args) -> dict:
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
        before = llm.engine.get_stats().device_time
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        in_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        device = str(llm.config.device)
        stats = llm.engine.get_stats()
        engine = {"max_num_seqs": llm.config.scheduler.max_num_seqs,  # as fitted to the KV pool when not given
                  "max_num_batched_tokens": llm.config.scheduler.max_num_batched_tokens,
                  "admission_reserve": llm.config.scheduler.admission_reserve,
                  "kv_pool_tokens": llm.engine.num_blocks * llm.config.cache.block_size,
                  "num_preemptions": stats.num_preemptions, "placement_policy": stats.placement_policy,
                  "prefill_tokens_by_lane": stats.prefill_tokens_by_lane,
                  "device_time": device_time_during(before, stats.device_time)}
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {
        "command": "rapid bench offline " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items())
                                                    if k not in ("func", "cmd", "bench_cmd") and v is not None),
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
    print(f"Total: {out_tokens} output tokens in {elapsed:.2f}s, {out_tokens / elapsed:.1f} tok/s "
          f"(total {(in_tokens + out_tokens) / elapsed:.1f} tok/s) -> {path}  [device={device}, "
          f"max_num_seqs {engine['max_num_seqs']}, {engine['num_preemptions']} preemptions]")
    return result

"""`rapid bench serve`: trace replay against the engine (in-process client), in the manner of `vllm bench serve`.

One trace (dataset + seeded arrivals) is replayed at each request rate, for each mode; per rate the
vllm-style metrics, SLO attainment, and per mode the goodput (highest rate with >= 90% attainment,
interpolated) per GPU. JSON and PNG plots go to --result-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

from tqdm.auto import tqdm

from rapid.bench.arrivals import arrival_times
from rapid.bench.datasets import SampleRequest, random_requests, sharegpt_like_requests, sharegpt_requests
from rapid.bench.metrics import RequestRecord, compute_metrics, goodput_per_gpu, goodput_rate, parse_goodput, slo_attainment
from rapid.protocol.engine import AddRequest
from rapid.params import SamplingParams

GPUS_PER_MODE = {"hybrid": 1, "rapid": 1, "disagg": 2}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=None, help="comma list of modes to sweep (default: --mode)")
    p.add_argument("--dataset-name", default="sharegpt-like", choices=["random", "sharegpt", "sharegpt-like"],
                   help="sharegpt-like: ShareGPT-shaped lengths, random tokens (default: %(default)s)")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (--dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests in the trace (default: %(default)s)")
    p.add_argument("--random-input-len", type=int, default=1024, help="--dataset-name random (default: %(default)s)")
    p.add_argument("--random-output-len", type=int, default=128, help="--dataset-name random (default: %(default)s)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="--dataset-name random: lengths vary by this fraction (default: %(default)s)")
    p.add_argument("--request-rates", default="1,2,4,8", help="requests/s, comma list; inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    p.add_argument("--ignore-eos", action="store_true", help="generate every request's full output length")
    p.add_argument("--goodput", nargs="*", default=["ttft:1000", "tpot:50"], help="SLOs, e.g. ttft:1000 tpot:50 (ms)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="cap output lengths (smoke runs)")
    p.add_argument("--result-dir", default="bench/results/serve", help="JSON and plots (default: %(default)s)")


def build_trace(args, vocab_size: int, max_len: int, tokenizer=None) -> list[SampleRequest]:
    if args.dataset_name == "random":
        reqs = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, vocab_size, seed=args.seed)
    elif args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
        if tokenizer is None:
            raise ValueError("the sharegpt dataset needs the model's tokenizer")
        reqs = sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, seed=args.seed, max_len=max_len)
    else:
        reqs = sharegpt_like_requests(args.num_prompts, vocab_size, seed=args.seed, max_len=max_len)
    return reqs


def replay(llm, trace: list[SampleRequest], rate: float, burstiness: float, seed: int, ignore_eos: bool,
           cap: int | None = None, tag: str = "") -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; record TTFT, ITL and latency from the output deltas."""
    client = llm.engine
    arrivals = arrival_times(len(trace), rate, burstiness, seed)
    records: dict[str, RequestRecord] = {}
    sent_at: dict[str, float] = {}
    last_token: dict[str, float] = {}
    next_i = 0
    pending: set[str] = set()
    bar = tqdm(total=len(trace), desc=f"{tag} rate={rate}", leave=False)
    start = time.perf_counter()
    while next_i < len(trace) or pending:
        now = time.perf_counter() - start
        while next_i < len(trace) and arrivals[next_i] <= now:
            req = trace[next_i]
            rid = f"{tag}{rate}-{next_i}"
            out_len = min(req.output_len, cap) if cap else req.output_len
            ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else llm.tokenizer.encode(req.prompt)
            records[rid] = RequestRecord(prompt_len=len(ids), output_len=0, arrival_time=float(arrivals[next_i]),
                                         start_time=now)
            sent_at[rid] = time.perf_counter()
            try:
                client.add_request(AddRequest(rid, ids, SamplingParams(temperature=0, max_tokens=out_len,
                                                                       ignore_eos=ignore_eos), arrival_time=time.time()))
                pending.add(rid)
            except ValueError as e:
                records[rid].success, records[rid].error = False, str(e)
                bar.update(1)
            next_i += 1
        wait = 0.0 if next_i >= len(trace) else max(0.0, arrivals[next_i] - (time.perf_counter() - start))
        for d in client.get_deltas(timeout_s=min(wait, 0.01)):
            rec = records.get(d.request_id)
            if rec is None:
                continue
            t = time.perf_counter()
            if d.new_token_ids:
                if rec.output_len == 0:
                    rec.ttft = t - sent_at[d.request_id]
                else:
                    gap = t - last_token[d.request_id]
                    rec.itl.extend([gap / len(d.new_token_ids)] * len(d.new_token_ids))
                rec.output_len += len(d.new_token_ids)
                last_token[d.request_id] = t
            if d.finished:
                rec.latency = t - sent_at[d.request_id]
                if d.error:
                    rec.success, rec.error = False, d.error
                pending.discard(d.request_id)
                bar.update(1)
    bar.close()
    return list(records.values()), time.perf_counter() - start


def run_serve(args) -> dict:
    import torch

    from rapid import LLM
    from rapid.config import EngineArgs

    slos = parse_goodput(args.goodput) if args.goodput else {}
    rates = [math.inf if r.strip() == "inf" else float(r) for r in args.request_rates.split(",")]
    modes = args.modes.split(",") if args.modes else [args.mode]
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"command": "rapid bench serve " + " ".join(_argv(args)),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
               "torch": torch.__version__, "slos_ms": slos, "modes": {}}
    for mode in modes:
        with LLM.from_engine_args(dataclasses.replace(EngineArgs.from_cli_args(args), mode=mode)) as llm:
            trace = build_trace(args, llm.model_config.vocab_size, llm.config.scheduler.max_model_len, llm.tokenizer)
            replay(llm, trace[: min(4, len(trace))], math.inf, 1.0, args.seed, True, cap=4, tag="warmup")
            per_rate = []
            for rate in rates:
                records, duration = replay(llm, trace, rate, args.burstiness, args.seed, args.ignore_eos,
                                           cap=args.max_tokens_cap, tag=f"{mode}-")
                metrics = compute_metrics(records, duration, slos or None)
                if slos:
                    metrics["slo_attainment"] = slo_attainment(records, slos.get("ttft"), slos.get("tpot"))
                per_rate.append({"request_rate": rate, **metrics,
                                 "records": [[r.prompt_len, r.output_len, r.ttft, r.latency, r.success] for r in records]})
                summary["modes"][mode] = {"per_rate": per_rate, "num_gpus": GPUS_PER_MODE[mode]}
                (out_dir / "serve.json").write_text(json.dumps(summary, indent=1, default=_json_default))
                tqdm.write(f"{mode} rate={rate}: {metrics['completed']} done, TTFT p50 {metrics['median_ttft_ms']:.1f} ms, "
                      f"TPOT p50 {metrics['median_tpot_ms']:.1f} ms, attainment {metrics.get('slo_attainment', float('nan')):.2f}")
        entry = {"per_rate": per_rate, "num_gpus": GPUS_PER_MODE[mode]}
        finite = [(p["request_rate"], p["slo_attainment"]) for p in per_rate if slos and math.isfinite(p["request_rate"])]
        if finite:
            g = goodput_rate([r for r, _ in finite], [a for _, a in finite])
            entry["goodput_rps"] = g.rate
            entry["goodput_rps_per_gpu"] = goodput_per_gpu(g, GPUS_PER_MODE[mode])
            entry["goodput_is_lower_bound"] = g.is_lower_bound
            entry["goodput_below_range"] = g.below_range
        summary["modes"][mode] = entry
    (out_dir / "serve.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    if slos:
        from rapid.bench.plots import plot_attainment, plot_latency_percentiles

        att = {m: [(p["request_rate"], p["slo_attainment"]) for p in e["per_rate"] if math.isfinite(p["request_rate"])]
               for m, e in summary["modes"].items()}
        plot_attainment(att, out_dir / "attainment.png", title=f"SLO attainment ({_slo_text(slos)})")
        lat = {m: [(p["request_rate"], p) for p in e["per_rate"] if math.isfinite(p["request_rate"])]
               for m, e in summary["modes"].items()}
        for metric in ("ttft", "tpot"):
            plot_latency_percentiles(lat, out_dir / f"{metric}.png", metric=metric, slo_ms=slos.get(metric))
    print(f"results in {out_dir}/serve.json")
    return summary


def _slo_text(slos: dict) -> str:
    return ", ".join(f"{k.upper()} {v:g} ms" for k, v in slos.items())


def _argv(args) -> list[str]:
    skip = {"func", "cmd", "bench_cmd"}
    return [f"--{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items()) if k not in skip and v is not None]


def _json_default(o):
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    return str(o)

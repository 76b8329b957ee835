"""`rapid bench serve`: steady-state trace replay, in the manner of `vllm bench serve`.

For each mode (one engine each, driven from this process; its engine core runs in a child process, as `rapid
serve` deploys it, unless --no-engine-process) or against an OpenAI-compatible server (--backend openai),
each request rate runs for --duration-s with prompts = rate x duration arriving as a Poisson process (gamma
gaps with --burstiness),
on a FRESH trace (seed + rate index: the engine has never seen its prompts, so no prefix-cache hits
between rates). Requests arriving in the warm-up are excluded; throughputs count what was served inside
the window; each rate is judged stable or not (rapid.bench.steady), and goodput (>= 90% SLO attainment,
interpolated) and saturation come from the stable rates only. serve.json (method, per-rate vllm
metrics, per-request records), serve.md and PNG plots (when matplotlib is installed) go to --result-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

from tqdm.auto import tqdm

from rapid.bench.metrics import parse_goodput
from rapid.bench.offline import decode_idle_during, device_time_during, prefill_worker_during
from rapid.bench.provenance import provenance
from rapid.bench.report import write_markdown, write_plots
from rapid.bench.results import mode_summary, pair_key, parse_slo_pairs, rate_result
from rapid.bench.steady import StabilityCriteria
from rapid.bench.traces import build_traces, parse_rates, plan_rates, rate_arrivals, shared_first_blocks

GPUS_PER_MODE = {"hybrid": 1, "rapid": 1, "disagg": 2}


def parse_configuration(label: str) -> tuple[str, dict]:
    """A --modes entry -> (mode, EngineArgs overrides): 'hybrid', 'rapid', 'rapid:static', 'rapid:adaptive',
    'rapid:static:50/50' (placement and/or prefill/decode MPS split), 'rapid:adaptive:slo=500/25' (the SLOs the
    placement plans for: TTFT/TPOT ms), 'rapid:atom:p2=50' (a second prefill worker at 50% of the SMs),
    'rapid:mixed:nomps' (the workers time-sliced, without MPS: with placement mixed, the layout's cost), and for any
    mode 'attn=flash' (the prefill attention; the default paged runs prefill and mixed batches as whole CUDA
    graphs, an SDPA choice as piecewise ones), so every baseline runs on the same traces."""
    from rapid.config import MODES, PLACEMENTS, PREFILL_ATTENTIONS, RapidConfig

    mode, *parts = label.split(":")
    if mode not in MODES:
        raise ValueError(f"--modes entry {label!r}: the mode must be one of {MODES}")
    overrides: dict = {}
    engine: dict = {}  # options of every mode's engine, not only rapid's
    seen: set[str] = set()
    for part in parts:
        kind = ("placement" if part in PLACEMENTS else "SLO pair" if part.startswith("slo=")
                else "second prefill share" if part.startswith("p2=")
                else "prefill attention" if part.startswith("attn=") else "MPS off" if part == "nomps" else "MPS split")
        if kind in seen:
            raise ValueError(f"--modes entry {label!r}: more than one {kind}")
        seen.add(kind)
        if part.startswith("attn="):
            if part[5:] not in PREFILL_ATTENTIONS:
                raise ValueError(f"--modes entry {label!r}: {part!r} names no prefill attention {PREFILL_ATTENTIONS}")
            engine["prefill_attention"] = part[5:]
        elif part in PLACEMENTS:
            overrides["placement"] = part
        elif part.startswith("slo=") and part[4:].count("/") == 1:
            try:
                overrides["slo_ttft_ms"], overrides["slo_tpot_ms"] = (float(x) for x in part[4:].split("/"))
            except ValueError:
                raise ValueError(f"--modes entry {label!r}: {part!r} needs numbers, as slo=500/25") from None
        elif part == "nomps":
            overrides["use_mps"] = False
        elif part.startswith("p2=") and part[3:].isdigit():
            overrides["second_prefill_sm_percentage"] = int(part[3:])
        elif part.count("/") == 1 and all(x.isdigit() for x in part.split("/")):
            p, d = (int(x) for x in part.split("/"))
            overrides.update(prefill_sm_percentage=p, decode_sm_percentage=d)
        else:
            raise ValueError(f"--modes entry {label!r}: {part!r} is neither a placement {PLACEMENTS}, an MPS split "
                             "such as 50/50, SLOs such as slo=500/25, a second prefill share such as p2=50, "
                             "nomps, nor a prefill attention such as attn=paged")
    if overrides and mode != "rapid":
        raise ValueError(f"--modes entry {label!r}: a placement, MPS split, SLOs, p2= or nomps apply to mode 'rapid' "
                         "only")
    if "MPS off" in seen and {"MPS split", "second prefill share"} & seen:
        raise ValueError(f"--modes entry {label!r}: an MPS split or p2= means nothing with nomps (no MPS shares)")
    try:
        RapidConfig(**overrides)  # the values themselves (split in [1, 100], SLOs positive), before any engine
    except ValueError as e:
        raise ValueError(f"--modes entry {label!r}: {e}") from None
    return mode, {**overrides, **engine}


WARMUP_TOKENS = 4


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="inproc", choices=["inproc", "openai"],
                   help="inproc: start the engine here (one per mode); openai: drive an OpenAI-compatible server "
                        "at --base-url (default: %(default)s)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="--backend openai (default: %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions", help="--backend openai (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="--backend openai: the request's model (default: --model)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--backend openai: vocabulary of the random prompts (default: the --model folder's config)")
    p.add_argument("--modes", default=None, help="comma list of configurations to sweep on the same traces (default: "
                   "--mode): a mode, or rapid with a placement, MPS split, SLOs and/or a second prefill share, e.g. "
                   "hybrid,rapid:static:100/100,rapid:static:50/50,rapid:adaptive:slo=500/25,rapid:atom:p2=50, "
                   "rapid:mixed:nomps (every prompt in the decode worker's steps, without MPS); any "
                   "mode may add attn=<prefill attention>, e.g. hybrid:attn=flash; with --backend openai, the one "
                   "label of the server's mode")
    p.add_argument("--dataset-name", default="sharegpt-like", choices=["random", "sharegpt", "sharegpt-like"],
                   help="sharegpt-like: ShareGPT-shaped lengths, random tokens (default: %(default)s)")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (--dataset-name sharegpt)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="seconds of arrivals per rate; prompts = rate x duration (default: 60 on a GPU or with "
                        "--backend openai, 15 on the CPU)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="requests arriving in the first seconds are excluded (default: 10%% of the duration, "
                        "at least 5 s, at most a quarter of it)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="override: this many prompts per rate (the duration is then num-prompts / rate)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="requests still running this long after the last arrival are aborted and count as "
                        "unfinished (default: %(default)s)")
    p.add_argument("--random-input-len", type=int, default=1024, help="--dataset-name random (default: %(default)s)")
    p.add_argument("--random-output-len", type=int, default=128, help="--dataset-name random (default: %(default)s)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="--dataset-name random: lengths vary by this fraction (default: %(default)s)")
    p.add_argument("--request-rates", "--request-rate", dest="request_rates", default="1,2,4,8",
                   help="requests/s, comma list; inf = all at once (needs --num-prompts); --request-rate is vLLM's "
                        "name (default: %(default)s)")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    p.add_argument("--ignore-eos", action="store_true", help="generate every request's full output length")
    p.add_argument("--goodput", nargs="*", default=["ttft:1000", "tpot:50"], help="SLOs, e.g. ttft:1000 tpot:50 (ms)")
    p.add_argument("--slo-pairs", default="1000/50,500/25",
                   help="TTFT_MS/TPOT_MS pairs: attainment and goodput of each (default: %(default)s)")
    p.add_argument("--unstable-ttft-slope", type=float, default=StabilityCriteria.max_ttft_slope,
                   help="TTFT seconds per second of arrivals above which a rate is unstable (default: %(default)s)")
    p.add_argument("--unstable-shortfall", type=float, default=StabilityCriteria.max_shortfall,
                   help="served below offered by more than this fraction: unstable (default: %(default)s)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="cap output lengths (smoke runs)")
    p.add_argument("--result-dir", default="bench/results/serve", help="JSON and plots (default: %(default)s)")


def _dataset_text(args) -> str:
    if args.dataset_name == "random":
        return (f"random tokens, {args.random_input_len} in / {args.random_output_len} out "
                f"(range ratio {args.random_range_ratio:g})")
    if args.dataset_name == "sharegpt":
        return f"ShareGPT file {args.dataset_path}: first human turn, completion length from the first answer"
    return "sharegpt-like: random tokens, ShareGPT-shaped lognormal lengths"


def _method(args, plans, criteria: StabilityCriteria, shared: int, duration_default: bool) -> dict:
    steady = [p for p in plans if p.steady]
    durations = sorted({round(p.duration_s, 3) for p in steady})
    warmups = sorted({round(p.warmup_s, 3) for p in steady})
    return {
        "backend": args.backend,
        "duration_s": {f"{p.rate:g}": p.duration_s for p in plans},
        "duration_text": (f"{args.num_prompts} prompts per rate ({', '.join(f'{d:g}' for d in durations)} s)"
                          if args.num_prompts is not None else f"{durations[0]:g} s of arrivals per rate")
        + (" (the default for this device)" if duration_default else ""),
        "warmup_s": {f"{p.rate:g}": p.warmup_s for p in plans},
        "warmup_text": ", ".join(f"{w:g} s" for w in warmups) or "none",
        "num_prompts": {f"{p.rate:g}": p.num_prompts for p in plans},
        "seeds": {f"{p.rate:g}": p.seed for p in plans},
        "warmup_seed": args.seed + len(plans),
        "arrivals": f"gamma gaps with shape {args.burstiness:g} (1 = Poisson), seeded per rate, rescaled so that "
                    "the last arrival falls at the duration",
        "dataset": _dataset_text(args),
        "max_tokens_cap": args.max_tokens_cap, "ignore_eos": args.ignore_eos,
        "drain_timeout_s": args.drain_timeout_s,
        "shared_first_blocks": shared, "block_size": args.block_size,
        "clock": "TTFT and E2E count from each request's scheduled arrival",
        "throughput": "request_throughput = served_rate (requests finished inside [warm-up, duration]) / window; "
                      "output_throughput = output tokens produced inside the window / window",
        "stability_criteria": criteria.as_dict(),
        "stability_rule": criteria.describe(),
    }


def _write(summary: dict, out_dir: Path) -> None:
    (out_dir / "serve.json").write_text(json.dumps(summary, indent=1, default=_json_default))


def _engine_counts(stats) -> dict:
    return {"prefill_tokens_by_lane": dict(stats.prefill_tokens_by_lane),
            "prefill_batches_by_lane": dict(stats.prefill_batches_by_lane), "preemptions": stats.num_preemptions,
            "prefill_batches_by_reason": dict(stats.prefill_batches_by_reason),
            "restarts": stats.num_restarts, "device_time": dict(stats.device_time),
            "decode_idle_totals": {k: list(v) for k, v in stats.decode_idle_totals.items()}}


def _engine_during(before: dict, after: dict, policy: str) -> dict:
    """What the engine did during one rate (its counters' differences): where the prompts ran, preemptions. A
    restart during the rate resets the counters: then they are the new incarnation's, and `restarts` says so."""
    restarts = after["restarts"] - before["restarts"]
    if restarts:
        before = {"prefill_tokens_by_lane": {}, "prefill_batches_by_lane": {}, "prefill_batches_by_reason": {},
                  "preemptions": 0, "device_time": {}}
    out = {"placement_policy": policy, "preemptions": after["preemptions"] - before["preemptions"],
           "restarts": restarts,  # and each worker stream's steps, busy and idle seconds during the rate:
           "device_time": device_time_during(before["device_time"], after["device_time"])}
    for key in ("prefill_tokens_by_lane", "prefill_batches_by_lane", "prefill_batches_by_reason"):
        out[key] = {lane: n - before[key].get(lane, 0) for lane, n in after[key].items()}
    out["prefill_batches_by_reason"] = {k: n for k, n in out["prefill_batches_by_reason"].items() if n}
    return out


def _sweep(summary: dict, mode: str, replay, warm, traces, plans, args, slos, pairs, criteria, out_dir,
           get_stats=None, learned: dict | None = None) -> None:
    """Warm the engine up, then every rate on its own trace; serve.json is rewritten after each rate.
    `get_stats`: the engine's stats (in process), to record where each rate's prompts ran; `learned`: the
    placement policy's costs as the replay took them at the trace's last arrival."""
    replay(warm, [0.0] * len(warm), True, cap=WARMUP_TOKENS, tag=f"{mode}-warmup", drain_timeout_s=None)
    per_rate = []
    for i, (plan, trace) in enumerate(zip(plans, traces)):
        arrivals = rate_arrivals(plan, args.burstiness)
        before = _engine_counts(get_stats()) if get_stats else None
        records, wall = replay(trace, arrivals, args.ignore_eos, cap=args.max_tokens_cap,
                               tag=f"{mode}-r{i}", drain_timeout_s=args.drain_timeout_s)
        r = rate_result(records, plan.rate, plan.duration_s, plan.warmup_s, wall, slos, pairs, criteria)
        r["seed"] = plan.seed
        if get_stats:
            stats = get_stats()
            r["engine"] = _engine_during(before, _engine_counts(stats), stats.placement_policy)
            # the policy's costs at the last arrival: after the drain they were a few small batches' (session 21)
            r["engine"]["placement_learned"] = dict(stats.placement_learned if learned is None else learned)
            totals_before = {} if r["engine"]["restarts"] else before["decode_idle_totals"]  # a restart resets them
            r["engine"]["decode_idle"] = decode_idle_during(r["engine"]["device_time"], stats, totals_before)
            r["engine"]["prefill_worker"] = prefill_worker_during(r["engine"]["device_time"], stats)  # host per batch
        per_rate.append(r)
        summary["modes"][mode] = mode_summary(per_rate, GPUS_PER_MODE.get(mode.split(":")[0], 1), pairs)
        _write(summary, out_dir)
        st = r["stability"]
        tqdm.write(f"{mode} rate={plan.rate:g}: {r['completed']} measured done, offered {_num(r['offered_rate'])} / "
                   f"served {r['served_rate']:.2f} req/s, TTFT p50 {r['median_ttft_ms']:.1f} ms, TPOT p50 "
                   f"{r['median_tpot_ms']:.1f} ms, {r['output_throughput']:.0f} out tok/s, attainment "
                   f"{_num(r.get('slo_attainment'))}, "
                   + ("stable" if st["stable"] else "no verdict" if st["stable"] is None else "UNSTABLE: "
                      + "; ".join(st["reasons"])))


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _openai_model_info(args) -> tuple[int, int, object]:
    """Vocabulary size, longest sequence and tokenizer (sharegpt only) for traces sent over HTTP."""
    cfg = {}
    if args.model and (Path(args.model) / "config.json").is_file():
        cfg = json.loads((Path(args.model) / "config.json").read_text())
    vocab = args.vocab_size or cfg.get("vocab_size")
    if args.dataset_name != "sharegpt" and not vocab:
        raise ValueError("--backend openai with random prompts needs --vocab-size or a --model folder with config.json")
    max_len = args.max_model_len or cfg.get("max_position_embeddings") or 4096
    tokenizer = None
    if args.dataset_name == "sharegpt":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    return int(vocab or 0), int(max_len), tokenizer


def run_serve(args) -> dict:
    slos = parse_goodput(args.goodput) if args.goodput else {}
    pairs = parse_slo_pairs(args.slo_pairs)
    criteria = StabilityCriteria(max_ttft_slope=args.unstable_ttft_slope, max_shortfall=args.unstable_shortfall)
    modes = args.modes.split(",") if args.modes else [args.mode]
    if args.backend == "openai" and len(modes) != 1:
        raise ValueError(f"--backend openai drives one server: give one --modes label, got {len(modes)}")
    if args.backend == "inproc":
        if len(set(modes)) != len(modes):
            raise ValueError(f"--modes repeats an entry: {args.modes!r} (each labels its own results)")
        for label in modes:
            parse_configuration(label)  # every entry checked before the first engine starts
    duration = args.duration_s
    if duration is None and args.num_prompts is None:
        duration = 60.0 if args.backend == "openai" or _has_cuda() else 15.0
    plans = plan_rates(parse_rates(args.request_rates), args.seed, duration, args.num_prompts, args.warmup_s)
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**provenance(args), "device": None, "accelerator": None, "torch": None,
               "slos_ms": slos, "slo_pairs": [pair_key(p) for p in pairs], "method": None, "modes": {}}
    setup = {}

    def traces_for(vocab, max_len, tokenizer):
        if not setup:  # the same traces for every mode
            warm, traces = build_traces(args, plans, vocab, max_len, tokenizer)
            shared = shared_first_blocks([warm, *traces], args.block_size, tokenizer)
            if shared:
                tqdm.write(f"note: {shared} prompts open with a KV block an earlier rate already used")
            summary["method"] = _method(args, plans, criteria, shared,
                                        args.duration_s is None and args.num_prompts is None)
            setup.update(warm=warm, traces=traces)
        return setup["warm"], setup["traces"]

    if args.backend == "openai":
        from rapid.bench.openai_backend import replay_openai

        summary["device"] = f"OpenAI-compatible server at {args.base_url}"
        warm, traces = traces_for(*_openai_model_info(args))
        model = args.served_model_name or args.model or "default"

        def replay(trace, arrivals, ignore_eos, *, cap, tag, drain_timeout_s):
            return replay_openai(args.base_url, trace, arrivals, ignore_eos, model=model, endpoint=args.endpoint,
                                 cap=cap, drain_timeout_s=drain_timeout_s)

        _sweep(summary, modes[0], replay, warm, traces, plans, args, slos, pairs, criteria, out_dir)
    else:
        _run_inproc(args, modes, summary, traces_for, plans, slos, pairs, criteria, out_dir)
    _write(summary, out_dir)
    write_markdown(summary, out_dir / "serve.md")
    plots = write_plots(summary, out_dir)
    if isinstance(plots, str):
        print(plots)
    print(f"results in {out_dir}/serve.json and serve.md")
    return summary


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_inproc(args, modes, summary, traces_for, plans, slos, pairs, criteria, out_dir) -> None:
    import torch

    from rapid import LLM
    from rapid.bench.replay import replay_inproc
    from rapid.config import EngineArgs
    from rapid.worker.gc_heap import startup_heap_frozen

    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    summary["accelerator"] = "GPU" if torch.cuda.is_available() else "CPU"  # what the report counts per
    summary["torch"] = torch.__version__
    for label in modes:
        mode, overrides = parse_configuration(label)
        engine_args = dataclasses.replace(EngineArgs.from_cli_args(args), mode=mode, **overrides)
        with LLM.from_engine_args(engine_args) as llm, startup_heap_frozen("rapid bench serve"):
            warm, traces = traces_for(llm.model_config.vocab_size, llm.config.scheduler.max_model_len, llm.tokenizer)

            learned: dict[str, float] = {}  # the policy's costs at a trace's last arrival, before its queue drains

            def replay(trace, arrivals, ignore_eos, *, cap, tag, drain_timeout_s, llm=llm, learned=learned):
                def snapshot():
                    learned.clear()
                    learned.update(llm.engine.get_stats().placement_learned)

                return replay_inproc(llm, trace, arrivals, ignore_eos, cap=cap, tag=tag,
                                     drain_timeout_s=drain_timeout_s, at_last_arrival=snapshot)

            _sweep(summary, label, replay, warm, traces, plans, args, slos, pairs, criteria, out_dir,
                   get_stats=llm.engine.get_stats, learned=learned)


def _json_default(o):
    return str(o)

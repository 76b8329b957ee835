"""`rapid generate | serve | batch | bench offline | bench serve`."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "rapid", "disagg"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--prefill-sm-percentage", type=int, default=70)
    p.add_argument("--decode-sm-percentage", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="dummy: random weights at the config's shapes (benchmarks without a checkpoint)")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="token ids in and out (no tokenizer files)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "triton", "flashinfer"])
    p.add_argument("--prefill-attention", default="flash", choices=["flash", "cudnn", "auto"],
                   help="CUDA prefill SDPA kernel: flash (default: no per-shape set-up), cudnn (faster on repeated "
                        "shapes, but builds a plan for every new length pair), auto (torch's choice)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, mode=args.mode, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, prefill_sm_percentage=args.prefill_sm_percentage,
        decode_sm_percentage=args.decode_sm_percentage, seed=args.seed, load_format=args.load_format,
        skip_tokenizer_init=args.skip_tokenizer_init, attention_backend=args.attention_backend,
        prefill_attention=args.prefill_attention,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from rapid import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    with LLM(**engine_kwargs(args)) as llm:
        use_chat = args.chat if args.chat is not None else getattr(llm.tokenizer, "chat_template", None) is not None
        t0 = time.perf_counter()
        if use_chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
        else:
            out = llm.generate(args.prompt, params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - t0
    comp = out.outputs[0]
    print(comp.text)
    ttft = out.metrics.ttft if out.metrics else None
    ttft_txt = f"{ttft * 1000:.1f} ms" if ttft is not None else "n/a"
    print(f"[TTFT {ttft_txt}, {len(comp.token_ids)} tokens in {elapsed:.2f}s, "
          f"{len(comp.token_ids) / max(elapsed, 1e-9):.1f} tokens/s, finish_reason={comp.finish_reason}]")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_cmd == "offline":
        from rapid.bench.offline import run_offline

        run_offline(args)
        return 0
    from rapid.bench.serve import run_serve

    run_serve(args)
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from rapid.bench.frontier import run_frontier

    batches = [int(x) for x in args.batches.split(",")]
    if args.mode == "hybrid":
        settings = [int(x) for x in args.chunks.split(",")]
    else:
        settings = [tuple(int(v) for v in x.split("/")) for x in args.splits.split(",")]
    run_frontier(args.model, args.mode, settings, batches, args.ctx, args.prefill_len, args.window_s,
                 args.output_json, max_model_len=args.max_model_len, load_format=args.load_format,
                 kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rapid.runtime.controller import FrontierPlanner

    planner = FrontierPlanner.from_json(args.frontier)
    best = planner.best(args.batch, args.tpot_slo_ms)
    if best is None:
        print(f"no measured point keeps p90 TPOT under {args.tpot_slo_ms} ms at batch {args.batch}")
        return 1
    gain = planner.gain(args.batch, args.tpot_slo_ms)
    print(f"{best.mode} {best.setting} (measured at batch {best.batch}): TPOT p90 {best.tpot_p90_ms} ms, "
          f"prefill {best.prefill_tok_s:.0f} tok/s"
          + (f"; rapid/hybrid prefill ratio under this SLO: {gain:.2f}x" if gain else "; no hybrid point meets it"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rapid.server import serve

    serve(args)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from rapid.batch import run_batch

    run_batch(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapid", description="RAPID LLM serving engine")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    _engine_args(g)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the model has one)")
    g.add_argument("--no-chat", dest="chat", action="store_false")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve over ZeroMQ")
    _engine_args(s)
    s.add_argument("--address", default=None, help="ZeroMQ endpoint (default ipc:// in a private directory, printed)")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback tcp:// address (no authentication!)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="offline batch: JSONL prompts in, JSONL outputs out")
    _engine_args(b)
    b.add_argument("input")
    b.add_argument("output")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--batch-size", type=int, default=None, help="lines per generate() call")
    b.set_defaults(func=cmd_batch)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    off = bsub.add_parser("offline", help="nano-vllm-style offline throughput")
    _engine_args(off)
    off.add_argument("--num-seqs", type=int, default=256)
    off.add_argument("--min-input-len", type=int, default=100)
    off.add_argument("--max-input-len", type=int, default=1024)
    off.add_argument("--min-output-len", type=int, default=100)
    off.add_argument("--max-output-len", type=int, default=1024)
    off.add_argument("--output-json", default=None, help="default: bench/results/offline-<mode>-<device>.json")
    off.set_defaults(func=cmd_bench)
    fr = bsub.add_parser("frontier", help="TPOT against prefill tokens/s: hybrid chunks vs rapid MPS splits")
    fr.add_argument("--model", required=True)
    fr.add_argument("--mode", choices=["hybrid", "rapid"], required=True)
    fr.add_argument("--chunks", default="256,512,1024,2048,4096", help="hybrid: prefill chunk sizes")
    fr.add_argument("--splits", default="50/50,60/40,70/30,80/40,100/100", help="rapid: prefill/decode MPS %%")
    fr.add_argument("--batches", default="16,64,256")
    fr.add_argument("--ctx", type=int, default=1024)
    fr.add_argument("--prefill-len", type=int, default=2048)
    fr.add_argument("--window-s", type=float, default=3.0)
    fr.add_argument("--max-model-len", type=int, default=4096)
    fr.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    fr.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    fr.add_argument("--output-json", default=None)
    fr.set_defaults(func=cmd_frontier)
    pl = bsub.add_parser("plan", help="pick the operating point for a decode batch and TPOT SLO from a measured frontier")
    pl.add_argument("--frontier", default="bench/results/frontier-h100.json")
    pl.add_argument("--batch", type=int, required=True)
    pl.add_argument("--tpot-slo-ms", type=float, required=True)
    pl.set_defaults(func=cmd_plan)
    try:
        from rapid.bench.serve import add_serve_args
    except ImportError:
        add_serve_args = None
    if add_serve_args is not None:
        sv = bsub.add_parser("serve", help="trace replay with Poisson arrivals, SLO attainment and goodput")
        _engine_args(sv)
        add_serve_args(sv)
        sv.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`rapid generate | serve | batch | bench offline | serve | frontier | plan`.

The engine flags are generated from rapid.config.EngineArgs (one per field); each subcommand adds its own."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time

from rapid.config import EngineArgs
from rapid.entrypoints.version import version


# bench frontier sets these itself (per measured point) and skips the tokenizer.
FRONTIER_OWN = ("mode", "max_num_seqs", "max_num_batched_tokens", "prefill_sm_percentage", "decode_sm_percentage",
                "skip_tokenizer_init", "tokenizer", "placement", "second_prefill_sm_percentage")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# rapid generate's sampling where neither its flags nor the model's defaults give one
GENERATE_DEFAULTS = {"max_tokens": 64, "temperature": 0.0}


def cmd_generate(args: argparse.Namespace) -> int:
    from rapid import LLM, SamplingParams

    with LLM.from_engine_args(EngineArgs.from_cli_args(args)) as llm:
        # the model's sampling defaults (--generation-config, --override-generation-config), the flags given on top
        given = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
        params = SamplingParams(**GENERATE_DEFAULTS | llm.default_sampling_params | given)
        has_template = getattr(llm.tokenizer, "chat_template", None) is not None
        use_chat = args.chat if args.chat is not None else has_template
        if use_chat and not has_template:
            raise ValueError(f"--chat: the tokenizer of {llm.config.tokenizer} has no chat template; use --no-chat "
                             "to send the prompt as it is")
        # warm-up (first-call compilation, allocator, lazy imports) outside the measurement
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
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


class _EveryLength(argparse.Action):
    """--input-len N / --output-len N: min and max of that length both N."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, f"min_{self.dest}_len", value)
        setattr(namespace, f"max_{self.dest}_len", value)


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
    engine = EngineArgs.from_cli_args(args)
    kwargs = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)
              if f.name not in FRONTIER_OWN + ("model", "max_model_len")}
    run_frontier(engine.model, args.mode, settings, batches, args.ctx, args.prefill_len, args.window_s,
                 args.output_json, max_model_len=engine.max_model_len, **kwargs)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rapid.core.controller import FrontierPlanner

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
    from rapid.entrypoints.serve import serve

    serve(args)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from rapid.entrypoints.batch import run_batch

    return run_batch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapid", description="RAPID LLM serving engine")
    parser.add_argument("--version", action="version", version=f"rapid {version()}")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, any case (default: %(default)s)")
    sub = parser.add_subparsers(dest="cmd")  # a missing command is named in main()

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=None, help="most output tokens (default: the model's default "
                   f"max_new_tokens, else {GENERATE_DEFAULTS['max_tokens']})")
    g.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default: the model's default, else 0)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the model has one)")
    EngineArgs.add_cli_args(g)
    g.set_defaults(func=cmd_generate)

    from rapid.entrypoints.serve import add_serve_args

    s = sub.add_parser("serve", help="serve the OpenAI HTTP API and ZeroMQ until SIGINT / SIGTERM")
    s.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model folder, as --model (vllm serve MODEL)")
    add_serve_args(s)
    EngineArgs.add_cli_args(s, defaults={"engine_process": True})  # hybrid's step loop away from the HTTP threads
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="offline batch: JSONL in (OpenAI batch or simple lines), JSONL out; resumable")
    b.add_argument("input", help="JSONL file, one request per line (see rapid.entrypoints.batch)")
    b.add_argument("output", help="JSONL file of results, appended as they finish (a re-run skips done custom_ids); "
                   "- for standard output")
    b.add_argument("--max-tokens", type=int, default=128,
                   help="default of each simple line; OpenAI batch lines take the HTTP server's (default: %(default)s)")
    b.add_argument("--temperature", type=float, default=0.0,
                   help="default of each simple line; OpenAI batch lines take the HTTP server's (default: %(default)s)")
    b.add_argument("--batch-size", type=int, default=None,
                   help="lines per generate() call (default: max(64, 4 x max_num_seqs))")
    EngineArgs.add_cli_args(b)
    b.set_defaults(func=cmd_batch)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True, metavar="{offline,serve,frontier,plan}")
    off = bsub.add_parser("offline", help="nano-vllm-style offline throughput")
    off.add_argument("--num-seqs", "--num-prompts", dest="num_seqs", type=int, default=256,
                     help="random prompts; --num-prompts is vLLM's name (default: %(default)s)")
    off.add_argument("--min-input-len", type=int, default=100, help="(default: %(default)s)")
    off.add_argument("--max-input-len", type=int, default=1024, help="(default: %(default)s)")
    off.add_argument("--min-output-len", type=int, default=100, help="(default: %(default)s)")
    off.add_argument("--max-output-len", type=int, default=1024, help="(default: %(default)s)")
    for kind in ("input", "output"):  # vLLM's `bench throughput` names: one length for every request
        off.add_argument(f"--{kind}-len", dest=kind, type=int, action=_EveryLength, default=argparse.SUPPRESS,
                         metavar="N",
                         help=f"every request's {kind} length: sets --min-{kind}-len and --max-{kind}-len, which "
                              "override it where they come after it")
    off.add_argument("--output-json", default=None, help="default: bench/results/offline-<mode>-<device>.json")
    EngineArgs.add_cli_args(off)
    off.set_defaults(func=cmd_bench)

    fr = bsub.add_parser("frontier", help="TPOT against prefill tokens/s: hybrid chunks vs rapid MPS splits")
    fr.add_argument("--mode", choices=["hybrid", "rapid"], required=True)
    fr.add_argument("--chunks", default="256,512,1024,2048,4096", help="hybrid: prefill chunk sizes")
    fr.add_argument("--splits", default="50/50,60/40,70/30,80/40,100/100", help="rapid: prefill/decode MPS %%")
    fr.add_argument("--batches", default="16,64,256", help="decode batch sizes")
    fr.add_argument("--ctx", type=int, default=1024, help="prompt tokens of each decode request")
    fr.add_argument("--prefill-len", type=int, default=2048, help="prompt tokens of each prefill-only request")
    fr.add_argument("--window-s", type=float, default=3.0, help="measurement window per point, in seconds")
    fr.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(fr, exclude=FRONTIER_OWN, defaults={"max_model_len": 4096})
    fr.set_defaults(func=cmd_frontier)

    pl = bsub.add_parser("plan", help="pick the operating point for a decode batch and TPOT SLO from a measured frontier")
    pl.add_argument("--frontier", default="bench/results/frontier-h200.json",
                    help="a frontier JSON (rapid bench frontier; default: the H200's, %(default)s)")
    pl.add_argument("--batch", type=int, required=True)
    pl.add_argument("--tpot-slo-ms", type=float, required=True)
    pl.set_defaults(func=cmd_plan)

    from rapid.bench.serve import add_serve_args

    sv = bsub.add_parser("serve", help="trace replay with Poisson arrivals, SLO attainment and goodput")
    add_serve_args(sv)
    # every mode's engine core in a child process, as rapid serve deploys it: hybrid's step loop does not share a
    # process (and its GIL) with the load generator, as rapid's decode worker never did
    EngineArgs.add_cli_args(sv, defaults={"engine_process": True})
    sv.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.cmd is None:  # `rapid --bogus`: name what was wrong, not only the missing command
        wrong = f"unrecognized arguments: {' '.join(unknown)}; " if unknown else ""
        parser.error(f"{wrong}choose a command: generate, serve, batch or bench (rapid COMMAND --help)")
    args = parser.parse_args(argv)  # with a command: argparse's own errors for anything unknown
    args.command_line = shlex.join(["rapid", *(sys.argv[1:] if argv is None else argv)])  # results record it
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # FileNotFoundError is an OSError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the engine was shut down on the way out; no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""GPU micro-benchmark: the split-K Triton GEMM (bench/splitk_gemm.py) against cuBLAS and cuBLASLt, M 16-128.

Each decode-step GEMM at Llama-3.1-8B shapes is timed as bench/gemm_shapes.py times it: one CUDA graph of --calls
calls over copies of the weight that together exceed L2, CUDA events, the median of --reps replays, over --calls.
Per batch M (--batches) and shape: torch's default BLAS (cuBLAS), cuBLASLt, and the SplitKConfigs of GRID that
`plan` keeps for that shape (see its docstring), each first checked once against F.linear (max |y - ref| / max |ref|;
over 2e-2, or two calls not bit-equal: invalid). Every kernel is compiled first by --compile-workers processes into
Triton's disk cache. After --max-seconds the sweep stops and writes what it has.
Usage (on the GPU machine):  python3 bench/splitk_gemm_sweep.py [--batches 16,32,64,128] [--out DIR]
                              -> splitk-gemm-sweep.json, splitk-gemm-sweep.md
  --plan: print the configs kept per (M, shape) and the kernels to compile (no GPU).  --dry-run: the code paths on
  the CPU through Triton's interpreter (M=16, shapes / 16, fp32, two configs, wall-clock times).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_shapes import HBM_BPS, L2_BYTES, LAYERS, SHAPES, ms_per_call  # bench/: this script's folder (and, through
# its import of kernels, the repository on sys.path)

if "--dry-run" in sys.argv:  # before the kernel's module is imported: Triton reads it when a kernel is decorated
    os.environ["TRITON_INTERPRET"] = "1"

from splitk_gemm import SplitKConfig  # noqa: E402

from rapid.compile.cuda_graphs import preferred_blas  # noqa: E402

GRID = [SplitKConfig(*c) for c in itertools.product((32, 64, 128, 256), (64, 128, 256), (1, 2, 4, 8), (4, 8),
                                                    (3, 4, 5))]
SMS = 132  # the H200's SMs
SMEM_BYTES = 227 * 1024  # shared memory one program may use on Hopper
MAX_REL_ERR = 2e-2
PER_LAYER = ("qkv", "o", "gate_up", "down")
DRY_CONFIGS = [SplitKConfig(64, 64, 1, 4, 3), SplitKConfig(32, 64, 4, 4, 3)]
OVERHEAD_S = 0.02  # a guess per timing: graph capture (Python launches) and instantiation, the checks, the kernel load


def block_m(m: int) -> int:
    return max(16, 1 << (m - 1).bit_length())


def fits(cfg: SplitKConfig, m: int, n: int, k: int) -> bool:
    """From 66 (half the SMs) to 8 x 132 programs; at least one BLOCK_K step per split; the operand buffers of
    num_stages steps in shared memory; at most 128 fp32 accumulator registers per thread."""
    programs = -(-n // cfg.block_n) * cfg.split_k
    smem = cfg.num_stages * (block_m(m) + cfg.block_n) * cfg.block_k * 2
    regs = block_m(m) * cfg.block_n // (cfg.num_warps * 32)
    return SMS // 2 <= programs <= 8 * SMS and cfg.block_k <= k // cfg.split_k and smem <= SMEM_BYTES and regs <= 128


def plan(m: int, shapes: dict[str, tuple[int, int]], cap: int) -> dict[str, list[SplitKConfig]]:
    """Shape -> the configs timed at batch m: those that fit, at most `cap`, first those that fit the most shapes (so
    that the shapes share configs: one config for all of them can be compared), then a fixed pseudo-random order
    (crc32 of the config), deterministic from run to run."""
    kept = {name: [c for c in GRID if fits(c, m, n, k)] for name, (n, k) in shapes.items()}
    shared = {c: sum(c in cands for cands in kept.values()) for c in GRID}
    order = {c: (-shared[c], zlib.crc32(repr(tuple(c)).encode())) for c in GRID}
    return {name: sorted(sorted(cands, key=order.get)[:cap]) for name, cands in kept.items()}


def num_copies(n: int, k: int) -> int:
    """Copies of a bf16 weight [n, k] that together exceed L2 at least twice (bench/gemm_shapes.py)."""
    return max(2, -(-2 * L2_BYTES // (n * k * 2)))


def estimate_s(plans: dict[int, dict[str, list]], shapes, calls: int, reps: int) -> float:
    """The sweep's seconds, compiles aside: every timing replays its graph reps + 3 times, each call reading the
    weight at 90% of HBM_BPS, plus OVERHEAD_S; cuBLAS and cuBLASLt are two more timings per (M, shape)."""
    total = 0.0
    for by_shape in plans.values():
        for name, cfgs in by_shape.items():
            n, k = shapes[name]
            graph_calls = -(-calls // num_copies(n, k)) * num_copies(n, k)
            total += (len(cfgs) + 2) * (graph_calls * (reps + 3) * n * k * 2 / (0.9 * HBM_BPS) + OVERHEAD_S)
    return round(total, 1)


def compile_key(m: int, k: int, cfg: SplitKConfig) -> tuple:
    """What one compiled GEMM kernel depends on (its constexprs and launch options): not the split count itself
    (the three reductions, SPLIT_K 2, 4, 8, compile along)."""
    return block_m(m), cfg.block_n, cfg.block_k, k % cfg.block_k == 0, cfg.split_k > 1, cfg.num_warps, cfg.num_stages


def compile_some(items: list[tuple[int, int, SplitKConfig]]) -> list[str]:
    """In a worker process: run each (m, k, config) once on a small weight [256, k], which compiles the same kernels
    (same constexprs, same divisibility of every integer argument) into Triton's disk cache. Returns the errors."""
    from splitk_gemm import splitk_gemm

    errors = []
    for m, k, cfg in items:
        try:
            splitk_gemm(torch.zeros(m, k, device="cuda", dtype=torch.bfloat16),
                        torch.zeros(256, k, device="cuda", dtype=torch.bfloat16), cfg)
            torch.cuda.synchronize()
        except Exception as e:  # registers, shared memory: the sweep records it again
            errors.append(f"{m} {tuple(cfg)}: {repr(e)[:120]}")
    return errors


def precompile(plans: dict[int, dict[str, list[SplitKConfig]]], shapes, workers: int) -> dict:
    items = {}
    for m, by_shape in plans.items():
        for name, cfgs in by_shape.items():
            for cfg in cfgs:
                items.setdefault(compile_key(m, shapes[name][1], cfg), (m, shapes[name][1], cfg))
    t0, jobs = time.perf_counter(), list(items.values())
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            errors = sum(pool.map(compile_some, [jobs[i::workers] for i in range(workers)]), [])
    except Exception as e:  # the workers failed: the sweep compiles each kernel on its first call instead
        errors = [f"precompile failed: {e!r}"[:200]]
    return {"kernels": len(jobs), "workers": workers, "seconds": round(time.perf_counter() - t0, 1),
            "errors": errors[:20], "error_count": len(errors)}


def make_timer(calls: int, reps: int, dry_run: bool):
    """fn(x, w) -> ms per call: a CUDA graph of `calls` calls over the copies (whole rounds: no copy read twice in a
    row); in a dry run one call's wall-clock time."""
    def graph_ms(fn, x, copies) -> float:
        return ms_per_call(fn, x, copies, calls, reps)

    def wall_ms(fn, x, copies) -> float:
        t0 = time.perf_counter()
        fn(x, copies[0])
        return (time.perf_counter() - t0) * 1e3

    return wall_ms if dry_run else graph_ms


def check(gemm, x, w, ref: torch.Tensor) -> tuple[float, bool, float]:
    """(max |y - ref| / max |ref|, two calls bit-equal, seconds of the first call: a compile if the cache missed)."""
    t0 = time.perf_counter()
    y = gemm(x, w)
    if x.is_cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    return err, torch.equal(y, gemm(x, w)), first_s


def sweep_shape(m, name, copies, cfgs, timer, deadline, dry_run) -> tuple[dict, list[dict]]:
    """cuBLAS, cuBLASLt and every config of `cfgs` on one shape at batch m: (summary, rows)."""
    from splitk_gemm import splitk_gemm

    n, k = copies[0].shape
    nbytes = (n * k + m * k + m * n) * copies[0].element_size()

    def tb_s(ms: float) -> float:
        return round(nbytes / ms / 1e9, 3)

    x = torch.randn(m, k, device=copies[0].device, dtype=copies[0].dtype)
    ref = F.linear(x, copies[0]).float()
    summary = {"batch": m, "gemm": name, "n": n, "k": k, "cublas_ms": round(timer(F.linear, x, copies), 5)}
    with contextlib.nullcontext() if dry_run else preferred_blas("cublaslt"):
        summary["cublaslt_ms"] = round(timer(F.linear, x, copies), 5)
    rows = []
    for cfg in cfgs:
        if time.perf_counter() > deadline:
            break
        row = {"batch": m, "gemm": name, "config": cfg._asdict()}
        try:
            err, same, first_s = check(lambda a, w, c=cfg: splitk_gemm(a, w, c), x, copies[0], ref)
            ms = timer(lambda a, w, c=cfg: splitk_gemm(a, w, c), x, copies)
        except Exception as e:  # a config Triton cannot build (registers, shared memory): recorded, skipped
            rows.append({**row, "error": repr(e)[:160]})
            continue
        rows.append({**row, "ms": round(ms, 5), "tb_s": tb_s(ms), "rel_err": float(f"{err:.3g}"),
                     "deterministic": same, "first_call_s": round(first_s, 3), "valid": err <= MAX_REL_ERR and same})
    valid = [r for r in rows if r.get("valid")]
    best = min(valid, key=lambda r: r["ms"]) if valid else None
    summary.update(cublas_tb_s=tb_s(summary["cublas_ms"]), cublaslt_tb_s=tb_s(summary["cublaslt_ms"]),
                   best=best and {"config": best["config"], "ms": best["ms"], "tb_s": best["tb_s"]},
                   configs_planned=len(cfgs), configs_timed=len(rows), complete=len(rows) == len(cfgs))
    return summary, rows


def step_ms(by_shape: dict[str, float]) -> float | None:
    """A step's products: 32 x the four layer GEMMs + the LM head (None if a shape is missing)."""
    if any(by_shape.get(s) is None for s in (*PER_LAYER, "lm_head")):
        return None
    return round(LAYERS * sum(by_shape[s] for s in PER_LAYER) + by_shape["lm_head"], 4)


def batch_report(m: int, summaries: list[dict], rows: list[dict]) -> dict:
    """Per batch: a step's products per library and for the best split-K, and the one config best for every layer
    GEMM (the lowest mean of ms / that shape's best over the four, among configs valid on all four)."""
    mine = {s["gemm"]: s for s in summaries if s["batch"] == m}
    best = {g: s["best"]["ms"] if s["best"] else None for g, s in mine.items()}
    steps = {"cublas": step_ms({g: s["cublas_ms"] for g, s in mine.items()}),
             "cublaslt": step_ms({g: s["cublaslt_ms"] for g, s in mine.items()}), "splitk_best": step_ms(best),
             "best_of_all": step_ms({g: min(v for v in (s["cublas_ms"], s["cublaslt_ms"], best[g]) if v is not None)
                                     for g, s in mine.items()})}
    timed = {}  # config -> {gemm: ms}
    for r in rows:
        if r["batch"] == m and r.get("valid"):
            timed.setdefault(tuple(r["config"].values()), {})[r["gemm"]] = r["ms"]
    common = [(c, t) for c, t in timed.items() if all(best.get(g) and g in t for g in PER_LAYER)]
    single = None
    if common:
        cfg, t = min(common, key=lambda ct: sum(ct[1][g] / best[g] for g in PER_LAYER))
        single = {"config": SplitKConfig(*cfg)._asdict(), "ms": {g: t[g] for g in PER_LAYER},
                  "worst_over_best_pct": round(max(t[g] / best[g] - 1 for g in PER_LAYER) * 100, 2),
                  "layers_ms": round(LAYERS * sum(t[g] for g in PER_LAYER), 4), "configs_compared": len(common)}
    return {"batch": m, "step_gemm_ms": steps, "one_config_for_the_layers": single}


def markdown(result: dict) -> str:
    lines = [f"# Split-K Triton GEMM against cuBLAS / cuBLASLt ({result['device']}, torch {result['torch']}, "
             f"triton {result['triton']})", "", f"`{result['command']}`: {result['seconds']} s"
             + (", stopped at --max-seconds (incomplete)" if result["stopped_early"] else ""), ""]
    for rep in result["batches"]:
        m = rep["batch"]
        lines += [f"## M = {m}", "", "| GEMM | N x K | cuBLAS us (TB/s) | cuBLASLt us (TB/s) | best split-K us (TB/s) "
                  "| config (block_n, block_k, split_k, warps, stages) |", "|---|---|---|---|---|---|"]
        for s in (s for s in result["shapes"] if s["batch"] == m):
            b = s["best"]
            best = f"{b['ms'] * 1e3:.2f} ({b['tb_s']})" if b else "-"
            lines.append(f"| {s['gemm']} | {s['n']} x {s['k']} | {s['cublas_ms'] * 1e3:.2f} ({s['cublas_tb_s']}) | "
                         f"{s['cublaslt_ms'] * 1e3:.2f} ({s['cublaslt_tb_s']}) | {best} | "
                         f"{tuple(b['config'].values()) if b else '-'} |")
        st, one = rep["step_gemm_ms"], rep["one_config_for_the_layers"]
        lines += ["", f"a step's products ({LAYERS} x (qkv, o, gate_up, down) + lm_head), ms: cuBLAS {st['cublas']}, "
                      f"cuBLASLt {st['cublaslt']}, best split-K {st['splitk_best']}, best of all {st['best_of_all']}"]
        if one:
            lines.append(f"one config for the four layer GEMMs: {tuple(one['config'].values())}, within "
                         f"{one['worst_over_best_pct']}% of each best ({LAYERS} layers: {one['layers_ms']} ms; "
                         f"{one['configs_compared']} configs timed on all four)")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="16,32,64,128")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--cap", type=int, default=60, help="configs per (M, shape) at most")
    ap.add_argument("--max-seconds", type=float, default=170)
    ap.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1), help="0: compile inline")
    ap.add_argument("--plan", action="store_true", help="print the configs kept and exit (no GPU)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter: the code paths only")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    batches = [16] if args.dry_run else [int(b) for b in args.batches.split(",")]
    shapes = {g: (n // 16, k // 16) for g, (n, k) in SHAPES.items()} if args.dry_run else dict(SHAPES)
    plans = {m: plan(m, shapes, args.cap) for m in batches}
    if args.plan or args.dry_run:
        for m, by_shape in plans.items():
            print(f"M={m}: " + ", ".join(f"{g} {len(c)}" for g, c in by_shape.items()) + " configs; kernels: "
                  f"{len({compile_key(m, shapes[g][1], c) for g, cs in by_shape.items() for c in cs})}")
        print(f"estimated: {estimate_s(plans, shapes, args.calls, args.reps)} s of timings, compiles aside")
        if args.plan:
            return
        plans = {16: {g: DRY_CONFIGS for g in shapes}}
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    compiled = None if args.dry_run or not args.compile_workers else precompile(plans, shapes, args.compile_workers)
    print(f"compiled: {compiled}", flush=True)
    torch.manual_seed(0)
    copies = {g: 2 if args.dry_run else num_copies(n, k) for g, (n, k) in shapes.items()}
    weights = {g: [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies[g])]
               for g, (n, k) in shapes.items()}
    timer = make_timer(args.calls, args.reps, args.dry_run)
    summaries, rows, stopped = [], [], False
    for m, name in itertools.product(batches, shapes):
        if time.perf_counter() > deadline:
            stopped = True
            break
        s, r = sweep_shape(m, name, weights[name], plans[m][name], timer, deadline, args.dry_run)
        summaries.append(s)
        rows += r
        stopped = stopped or not s["complete"]
        b = s["best"]
        print(f"M={m:<4d}{name:8s} cublas {s['cublas_ms'] * 1e3:8.2f} us  cublaslt {s['cublaslt_ms'] * 1e3:8.2f} us"
              f"  split-K {b and round(b['ms'] * 1e3, 2)} us {b and tuple(b['config'].values())}"
              f"  ({s['configs_timed']}/{s['configs_planned']} configs)", flush=True)
    triton = __import__("triton")
    result = {"command": "python3 " + " ".join(sys.argv), "device": "cpu (dry run)" if args.dry_run else
              torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "default_blas": str(torch.backends.cuda.preferred_blas_library()),
              "method": "per call: a CUDA graph of --calls calls over weight copies exceeding L2, CUDA events, median "
                        "of --reps replays after 3, over --calls; bf16; TB/s of (W + x + y) bytes",
              "rooflines": {"hbm_copy_tb_s": HBM_BPS / 1e12}, "compiled": compiled, "stopped_early": stopped,
              "estimated_s": None if args.dry_run else estimate_s(plans, shapes, args.calls, args.reps),
              "seconds": round(time.perf_counter() - t_start, 1), "shapes": summaries,
              "batches": [batch_report(m, summaries, rows) for m in batches], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splitk-gemm-sweep.json").write_text(json.dumps(result, indent=1))
    (out / "splitk-gemm-sweep.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()

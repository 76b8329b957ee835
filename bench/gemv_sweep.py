"""GPU micro-benchmark: the Triton matrix-vector product (rapid/model/gemv.py) against cuBLAS at batch 1.

Each decode-step GEMM at Llama-3.1-8B shapes is timed as bench/gemm_shapes.py times it: one CUDA graph of --calls
calls over copies of the weight that together exceed L2, CUDA events, the median of --reps replays, over --calls.
Every GemvConfig of the grid runs on every shape. (Session 30's first sweep also timed a residual add + RMSNorm
prologue fused into the kernel: it tied on qkv and lost 10% on gate_up, so it went.)
Usage (on the GPU machine):  python3 bench/gemv_sweep.py [--out DIR]   -> gemv-sweep.json, gemv-sweep.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_shapes import HBM_BPS, L2_BYTES, LAYERS, SHAPES, ms_per_call  # bench/: this script's folder

from rapid.model.gemv import gemv
from rapid.model.linear import GemvConfig, config_for

# call 2's grid without its three 4- and 8-row blocks, and whole 4096-column rows (a larger grid in call 4, with 4
# rows x 4096 columns on 1 warp, did not finish in 60 s)
GRID = [GemvConfig(*c) for c in itertools.product((1, 2), (512, 1024, 2048), (1, 2, 4, 8), (2, 3, 4))] + [
    GemvConfig(2, 4096, 2, 3), GemvConfig(2, 4096, 4, 3), GemvConfig(1, 4096, 2, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                      for _ in range(max(2, -(-2 * L2_BYTES // (n * k * 2))))] for name, (n, k) in SHAPES.items()}
    rows = []
    for name, copies in weights.items():
        n, k = copies[0].shape
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, copies[0]).float()
        cublas = ms_per_call(F.linear, x, copies, args.calls, args.reps)
        rows.append({"gemm": name, "n": n, "k": k, "kernel": "cublas", "ms": round(cublas, 5)})
        best = None
        for cfg in GRID:
            try:
                y = gemv(x, copies[0], cfg)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                ms = ms_per_call(lambda a, w, c=cfg: gemv(a, w, c), x, copies, args.calls, args.reps)
            except Exception as e:  # a config Triton cannot build (registers, shared memory): recorded, skipped
                rows.append({"gemm": name, "kernel": "triton", "config": cfg._asdict(), "error": repr(e)[:160]})
                continue
            rows.append({"gemm": name, "n": n, "k": k, "kernel": "triton", "config": cfg._asdict(), "ms": round(ms, 5),
                         "rel_err": round(err, 6)})
            if best is None or ms < best[0]:
                best = (ms, cfg)
        print(f"{name:8s} cublas {cublas * 1e3:7.2f} us  best triton {best[0] * 1e3:7.2f} us {tuple(best[1])}",
              flush=True)
    best_by_shape = {}
    for name in SHAPES:
        cands = [r for r in rows if r["gemm"] == name and r["kernel"] == "triton" and "ms" in r]
        b = min(cands, key=lambda r: r["ms"])
        cub = next(r for r in rows if r["gemm"] == name and r["kernel"] == "cublas")
        n, k = SHAPES[name]
        mine = config_for(k)._asdict()  # the engine's choice (rapid/model/linear.py)
        engine = next((r["ms"] for r in cands if r["config"] == mine), None)
        best_by_shape[name] = {"cublas_ms": cub["ms"], "triton_ms": b["ms"], "config": b["config"],
                               "engine_config": mine, "engine_config_ms": engine,
                               "cublas_tb_s": round(n * k * 2 / cub["ms"] / 1e9, 3),
                               "triton_tb_s": round(n * k * 2 / b["ms"] / 1e9, 3)}
    per_layer = ("qkv", "o", "gate_up", "down")
    step = {kind: round(LAYERS * sum(best_by_shape[s][f"{kind}_ms"] for s in per_layer)
                        + best_by_shape["lm_head"][f"{kind}_ms"], 3) for kind in ("cublas", "triton")}
    step["best_of_each"] = round(LAYERS * sum(min(best_by_shape[s]["cublas_ms"], best_by_shape[s]["triton_ms"])
                                              for s in per_layer)
                                 + min(best_by_shape["lm_head"]["cublas_ms"], best_by_shape["lm_head"]["triton_ms"]), 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python3 " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": __import__("triton").__version__, "cuda": torch.version.cuda,
              "method": "per call: a CUDA graph of --calls calls over weight copies exceeding L2, CUDA events, "
                        "median of --reps replays after 3, over --calls; batch 1, bf16",
              "rooflines": {"hbm_copy_tb_s": HBM_BPS / 1e12}, "best_by_shape": best_by_shape,
              "step_gemm_ms": step, "rows": rows, "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "gemv-sweep.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Batch-1 GEMV: Triton (rapid/model/gemv.py) against cuBLAS ({result['device']})", "",
             "| GEMM | N x K | cuBLAS us (TB/s) | Triton best us (TB/s) | config |", "|---|---|---|---|---|"]
    for s, r in best_by_shape.items():
        n, k = SHAPES[s]
        lines.append(f"| {s} | {n} x {k} | {r['cublas_ms'] * 1e3:.2f} ({r['cublas_tb_s']}) | "
                     f"{r['triton_ms'] * 1e3:.2f} ({r['triton_tb_s']}) | {tuple(r['config'].values())} |")
    lines += ["", f"Step GEMMs (32 layers + LM head), ms: {step}"]
    (out / "gemv-sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

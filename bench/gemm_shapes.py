"""GPU micro-benchmark: the decode step's GEMMs at Llama-3.1-8B shapes, per BLAS backend, against the copy roofline.

A decode step at batch M runs, per layer, x[M, K] @ W[N, K]^T for the fused QKV, the attention output, the fused
gate/up and the down projection, then the LM head once. Each is timed alone (CUDA events, median of --reps after
warm-up, weights larger than L2 so every call reads them from HBM) with torch's default cuBLAS path, with cuBLASLt
(torch.backends.cuda.preferred_blas_library) and, with --autotune, with Inductor's max-autotune templates. The
step's GEMM time is 32 x the four layer GEMMs + the LM head.
Usage (on the GPU machine):  python3 bench/gemm_shapes.py [--batches 1,64,256] [--autotune] [--out DIR]
Writes gemm-shapes.json and gemm-shapes.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HBM_BPS = 4.3e12  # the H200's copy rate (bench/results/REPORT.md)
LAYERS = 32
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # name -> (N out features, K in features)


def median_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def linear_fn(backend: str):
    """F.linear as the backend runs it: 'cublas' / 'cublaslt' (eager), 'autotune' (Inductor max-autotune)."""
    if backend == "autotune":
        return torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    return F.linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--autotune", action="store_true", help="also Inductor's max-autotune GEMM templates (slow)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for name, (n, k) in SHAPES.items()}
    backends = ["cublas", "cublaslt"] + (["autotune"] if args.autotune else [])
    rows = []
    for backend in backends:
        torch.backends.cuda.preferred_blas_library("cublaslt" if backend == "cublaslt" else "cublas")
        fn = linear_fn(backend)
        for m in (int(b) for b in args.batches.split(",")):
            for name, w in weights.items():
                x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
                t0 = time.perf_counter()
                ms = median_ms(lambda: fn(x, w), args.reps)  # noqa: B023 (called before the next iteration)
                bytes_read = w.numel() * 2 + x.numel() * 2 + m * w.shape[0] * 2
                rows.append({"backend": backend, "batch": m, "gemm": name, "n": w.shape[0], "k": w.shape[1],
                             "ms": round(ms, 4), "tb_s": round(bytes_read / ms / 1e9, 3),
                             "of_copy_roofline": round(bytes_read / ms / 1e9 / (HBM_BPS / 1e12), 3),
                             "setup_s": round(time.perf_counter() - t0, 1)})
                print(f"{backend:9s} M={m:<4d} {name:8s} {ms:.4f} ms  {rows[-1]['tb_s']:.2f} TB/s", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    steps = []
    for backend in backends:
        for m in sorted({r["batch"] for r in rows}):
            t = {r["gemm"]: r["ms"] for r in rows if r["backend"] == backend and r["batch"] == m}
            ms = LAYERS * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
            steps.append({"backend": backend, "batch": m, "step_gemm_ms": round(ms, 3)})
    weight_bytes = sum(LAYERS * n * k * 2 for name, (n, k) in SHAPES.items() if name != "lm_head")
    weight_bytes += SHAPES["lm_head"][0] * SHAPES["lm_head"][1] * 2
    floor_ms = weight_bytes / HBM_BPS * 1e3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python3 " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "method": "CUDA events, median of reps after 5 warm-up calls; each GEMM alone",
              "rooflines": {"hbm_copy_tb_s": HBM_BPS / 1e12}, "weights_read_floor_ms": round(floor_ms, 3),
              "gemms": rows, "steps": steps}
    (out / "gemm-shapes.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Decode-step GEMMs, Llama-3.1-8B shapes ({result['device']}, torch {torch.__version__})", "",
             f"Weights read at {HBM_BPS / 1e12} TB/s: {floor_ms:.3f} ms a step.", "",
             "| backend | batch | step GEMMs (ms) | of the floor |", "|---|---|---|---|"]
    lines += [f"| {s['backend']} | {s['batch']} | {s['step_gemm_ms']} | {floor_ms / s['step_gemm_ms']:.0%} |"
              for s in steps]
    lines += ["", "| backend | batch | GEMM | N x K | ms | TB/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['batch']} | {r['gemm']} | {r['n']} x {r['k']} | {r['ms']} | {r['tb_s']} |"
              for r in rows]
    (out / "gemm-shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(steps)]))


if __name__ == "__main__":
    main()

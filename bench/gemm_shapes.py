"""GPU micro-benchmark: the decode step's GEMMs at Llama-3.1-8B shapes, per BLAS backend, against the copy roofline.

A decode step at batch M runs, per layer, x[M, K] @ W[N, K]^T for the fused QKV, the attention output, the fused
gate/up and the down projection, then the LM head once. Each GEMM is timed as the engine runs it, inside a CUDA
graph: one graph replays --calls calls back to back, each on the next of enough copies of the weight that together
they exceed L2 (every call reads its weight from HBM); the time per call is the graph's (CUDA events, median of
--reps replays after warm-up) over --calls. Backends: torch's default cuBLAS path, cuBLASLt
(torch.backends.cuda.preferred_blas_library), Inductor's max-autotune templates ('autotune'), cuBLASLt split over K
by hand ('splitk2', 'splitk4': a batched product of the K slices into float32, then their sum) and torch's TunableOp
('tunable'). The step's GEMM time is 32 x the four layer GEMMs + the LM head.
Usage (on the GPU machine):  python3 bench/gemm_shapes.py [--batches 1,64,256] [--backends cublas,cublaslt,autotune]
                             [--gemms qkv,o] [--out DIR]
Writes gemm-shapes.json and gemm-shapes.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kernels import median_ms  # bench/: this script's own folder (CUDA events, median after 3 warm-up calls)

HBM_BPS = 4.3e12  # the H200's copy rate (bench/results/REPORT.md)
LAYERS = 32
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # name -> (N out features, K in features)
L2_BYTES = 50 * 2**20  # the H100's and H200's L2; the copies of one weight together exceed it at least twice


def graph_of_calls(fn, x: torch.Tensor, copies: list[torch.Tensor], calls: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of `calls` calls fn(x, w), w cycling through `copies`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in copies:  # warm-up outside capture (cuBLAS workspaces, Inductor's compile and autotuning)
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, copies[i % len(copies)])
    return graph


def ms_per_call(fn, x: torch.Tensor, copies: list[torch.Tensor], calls: int, reps: int) -> float:
    """fn(x, w)'s device time per call: graph_of_calls of `calls` rounded up to whole rounds of the copies (no copy
    read twice in a row), the median of `reps` replays over the calls."""
    calls = -(-calls // len(copies)) * len(copies)
    graph = graph_of_calls(fn, x, copies, calls)
    ms = median_ms(graph.replay, reps) / calls
    del graph
    return ms


def splitk_linear(splits: int):
    """x @ w^T as `splits` products over slices of K, batched in one cuBLAS call into float32, summed and rounded once."""

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        xs = x.view(m, splits, k // splits).transpose(0, 1)  # [S, M, K/S], no copy
        ws = w.view(w.shape[0], splits, k // splits).permute(1, 2, 0)  # [S, K/S, N], no copy
        return torch.bmm(xs, ws, out_dtype=torch.float32).sum(0).to(x.dtype)  # [M, N]

    return fn


def linear_fn(backend: str):
    """F.linear as the backend runs it: 'cublas' / 'cublaslt' (eager), 'autotune' (Inductor max-autotune: a fresh
    compile for each shape, so that no shape falls back to eager at Dynamo's recompile limit)."""
    if backend == "autotune":
        torch._dynamo.reset()
        return torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    if backend.startswith("splitk"):
        return splitk_linear(int(backend.removeprefix("splitk")))
    if backend.startswith("c-splitk"):  # the same inside torch.compile, as the engine's pieces would run it
        torch._dynamo.reset()
        return torch.compile(splitk_linear(int(backend.removeprefix("c-splitk"))), dynamic=False)
    return F.linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed")
    ap.add_argument("--calls", type=int, default=32, help="GEMM calls in one graph")
    ap.add_argument("--autotune", action="store_true", help="also Inductor's max-autotune GEMM templates (slow)")
    ap.add_argument("--backends", default=None, help="comma list of cublas, cublaslt, autotune, splitk2, splitk4, "
                    "c-splitk2 (compiled), tunable (default: cublas,cublaslt[,autotune])")
    ap.add_argument("--gemms", default=",".join(SHAPES), help="which of the step's GEMMs to time")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = {}  # name -> copies of the weight [N, K], together at least twice L2
    for name, (n, k) in SHAPES.items():
        count = max(2, -(-2 * L2_BYTES // (n * k * 2)))
        weights[name] = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    backends = ["cublas", "cublaslt"] + (["autotune"] if args.autotune else [])
    if args.backends:
        backends = args.backends.split(",")
    wanted = args.gemms.split(",")
    rows = []
    for backend in backends:
        torch.backends.cuda.preferred_blas_library("cublas" if backend == "cublas" else "cublaslt")
        torch.cuda.tunable.enable(backend == "tunable")
        torch.cuda.tunable.tuning_enable(backend == "tunable")
        for m in (int(b) for b in args.batches.split(",")):
            for name, copies in ((n, c) for n, c in weights.items() if n in wanted):
                n, k = copies[0].shape
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t0 = time.perf_counter()
                fn = linear_fn(backend)
                ref = F.linear(x, copies[0]).float()
                err = ((fn(x, copies[0]).float() - ref).norm() / ref.norm()).item()  # against torch's own product
                ms = ms_per_call(fn, x, copies, args.calls, args.reps)
                bytes_read = n * k * 2 + x.numel() * 2 + m * n * 2
                rows.append({"backend": backend, "batch": m, "gemm": name, "n": n, "k": k, "weight_copies": len(copies),
                             "ms": round(ms, 4), "rel_err": round(err, 6), "tb_s": round(bytes_read / ms / 1e9, 3),
                             "of_copy_roofline": round(bytes_read / ms / 1e9 / (HBM_BPS / 1e12), 3),
                             "setup_s": round(time.perf_counter() - t0, 1)})
                print(f"{backend:9s} M={m:<4d} {name:8s} {ms:.4f} ms  {rows[-1]['tb_s']:.2f} TB/s  err {err:.1e}", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    if "tunable" in backends:  # what TunableOp chose per shape (on CUDA builds it may offer only 'Default')
        print("tunable results:", torch.cuda.tunable.get_results(), flush=True)
        torch.cuda.tunable.enable(False)
    steps = []
    for backend in backends:
        for m in sorted({r["batch"] for r in rows}):
            t = {r["gemm"]: r["ms"] for r in rows if r["backend"] == backend and r["batch"] == m}
            if len(t) < len(SHAPES):
                continue
            ms = LAYERS * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
            steps.append({"backend": backend, "batch": m, "step_gemm_ms": round(ms, 3)})
    weight_bytes = sum(LAYERS * n * k * 2 for name, (n, k) in SHAPES.items() if name != "lm_head")
    weight_bytes += SHAPES["lm_head"][0] * SHAPES["lm_head"][1] * 2
    floor_ms = weight_bytes / HBM_BPS * 1e3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python3 " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "method": "per call: a CUDA graph of --calls calls over weight copies exceeding L2, CUDA events, "
                        "median of --reps replays after 3, over --calls",
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

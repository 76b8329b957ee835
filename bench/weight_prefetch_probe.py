"""GPU probe (not yet run): does pulling a decode GEMM's weight into L2 beside the step's other work shorten the step?

At batch 64 the decode step's small GEMMs run below the copy rate (cuBLASLt: o_proj 2.7-2.9 TB/s, QKV about 3.5,
down 3.8; REPORT.md section 3), and no GEMM kernel measured beats cuBLASLt's. The loss sits at each GEMM's start
and end, where few loads are in flight. This probe asks whether a second stream can move a weight's bytes into L2
while the first runs the work before the GEMM, so that the GEMM starts on weights already near the SMs.

One "layer" here is the work before o_proj and o_proj itself: a streaming read of ATTN_MB of KV-like data (the
decode attention of one layer at batch 64, context 1024), a latency-bound kernel on [M, 4096] (the attention's
split merge, the norm), then x[M, 4096] @ W[N, K]^T. Every layer reads its own weight copy and its own KV block, so
no layer finds the last one's bytes in L2. Variants, each one CUDA graph of LAYERS layers:
  base          the layer as the engine runs it;
  prefetch      a side stream loads the layer's weight (evict_last) from the start of the latency-bound kernel;
  early         the side stream starts with the streaming read instead;
  early_ef      as early, the streaming read marked evict_first, so that it does not push the weight out;
  no_gemm       the streaming read and the latency-bound kernel alone;
  gemm_hot      the GEMM alone, one weight for every layer (its bytes stay in L2).
Time per layer: the graph's (CUDA events, median of --reps replays) / LAYERS, the middle of three such medians. A
variant pays where it beats base by more than the replays' spread; 32 x that is a decode step's gain for this GEMM.
No prefetch can give more than base - no_gemm - gemm_hot (the GEMM as if its weight were in L2 and its start free).
Usage (GPU):  python3 bench/weight_prefetch_probe.py [--batch 64] [--gemms o,qkv,down] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from kernels import median_ms  # bench/: CUDA events, median after warm-up

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336)}  # name -> (N, K) at Llama-3.1-8B
ATTN_MB = 268  # KV bytes one layer's decode attention reads at batch 64, context 1024 (8.6 GB / 32)
BLOCK = 8192  # elements a program of the read kernels loads
VARIANTS = ("base", "prefetch", "early", "early_ef", "no_gemm", "gemm_hot")


@triton.jit
def _read(src_ptr, n, sink_ptr, EVICT_FIRST: tl.constexpr, EVICT_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Load src[n] once (as attention reads KV, or to pull a weight into L2) and keep the loads live: a program
    stores its sum only if it is NaN, which finite data never is."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVICT_FIRST:
        x = tl.load(src_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_first")
    elif EVICT_LAST:
        x = tl.load(src_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    total = tl.sum(x.to(tl.float32), axis=0)
    tl.store(sink_ptr + tl.program_id(0), total, mask=total != total)


def read(src: torch.Tensor, sink: torch.Tensor, evict: str = "normal") -> None:
    """Stream every element of src through the SMs; evict: 'normal', 'first' or 'last' (the L2 policy)."""
    n = src.numel()
    _read[(triton.cdiv(n, BLOCK),)](src, n, sink, EVICT_FIRST=evict == "first", EVICT_LAST=evict == "last",
                                    BLOCK=BLOCK, num_warps=8)


def layer_graph(variant: str, x, weights, kv, sink, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """One graph of len(weights) layers in `variant`'s order (the module docstring's list)."""
    main = torch.cuda.current_stream()

    def layers():
        for w, block in zip(weights, kv):
            if variant in ("early", "early_ef"):  # the side stream from the streaming read on
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    read(w, sink, "last")
            if variant != "gemm_hot":
                read(block, sink, "first" if variant == "early_ef" else "normal")
            if variant == "prefetch":  # the side stream from the latency-bound kernel on
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    read(w, sink, "last")
            y = x if variant == "gemm_hot" else torch.rms_norm(x, (x.shape[1],))  # [M, K]: the latency-bound kernel
            if variant in ("prefetch", "early", "early_ef"):
                main.wait_stream(side)
            if variant != "no_gemm":
                torch.matmul(y, w.t())  # [M, K] @ [K, N]

    warm = torch.cuda.Stream()
    warm.wait_stream(main)
    with torch.cuda.stream(warm):  # Triton's compile, cuBLAS's workspace: outside the capture
        layers()
    main.wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers()
    return graph


def probe(gemm: str, batch: int, layers: int, reps: int) -> dict:
    n, k = SHAPES[gemm]
    x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    kv = torch.randn(layers, ATTN_MB * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    sink = torch.zeros(triton.cdiv(kv.shape[1], BLOCK), device="cuda", dtype=torch.float32)
    side = torch.cuda.Stream(priority=-1)  # its programs go first when SMs free up
    out = {"gemm": gemm, "batch": batch, "n": n, "k": k, "layers": layers, "weight_mb": n * k * 2 / 2**20}
    for variant in VARIANTS:
        ws = [weights[0]] * layers if variant == "gemm_hot" else weights
        graph = layer_graph(variant, x, ws, kv, sink, side)
        runs = sorted(median_ms(graph.replay, reps) / layers for _ in range(3))
        out[variant] = {"us_per_layer": round(runs[1] * 1e3, 2), "spread_us": round((runs[2] - runs[0]) * 1e3, 2)}
        del graph
    base = out["base"]["us_per_layer"]
    for variant in ("prefetch", "early", "early_ef"):
        out[variant]["step_gain_ms_x32"] = round((base - out[variant]["us_per_layer"]) * 32 / 1e3, 3)
    bound = base - out["no_gemm"]["us_per_layer"] - out["gemm_hot"]["us_per_layer"]
    out["bound_step_gain_ms_x32"] = round(bound * 32 / 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gemms", default="o,qkv,down")
    ap.add_argument("--layers", type=int, default=8, help="distinct weight copies and KV blocks per graph")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.backends.cuda.preferred_blas_library("cublaslt")  # the engine's library at batch 32-96
    results = [probe(g, args.batch, args.layers, args.reps) for g in args.gemms.split(",")]
    lines = ["| GEMM | " + " | ".join(VARIANTS) + " | bound on the gain |", "|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in results:
        cells = [f"{r[v]['us_per_layer']} us (+-{r[v]['spread_us']})" + (f", {r[v]['step_gain_ms_x32']:+.3f} ms/step"
                 if "step_gain_ms_x32" in r[v] else "") for v in VARIANTS]
        lines.append(f"| {r['gemm']} ({r['weight_mb']:.0f} MB) | " + " | ".join(cells)
                     + f" | {r['bound_step_gain_ms_x32']:+.3f} ms/step |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight-prefetch.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch":
                                                          torch.__version__, "args": vars(args), "results": results},
                                                         indent=1))
    (out / "weight-prefetch.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

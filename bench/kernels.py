"""GPU micro-benchmark: paged decode attention, whole-model decode steps (CUDA graphs) and prefill.

Llama-3.1-8B shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 14336,
vocab 128256) with random bf16 weights built in memory (no download). Every figure is a median of
CUDA-event timings after warm-up, against its roofline:
  decode  = (weights read + KV read for that context) / the copy rate of the GPU found (HBM_BPS_BY_GPU: H100
            3.0e12 B/s, H200 4.3e12, both measured on the lent machines)
  prefill = (2 * layer params * tokens + 2 * hidden * vocab + causal attention FLOPs) / 790e12 FLOP/s
Usage (on the GPU machine):  python3 bench/kernels.py [--sweep] [--apply-best] [--compile-dynamic tokens]
                              [--skip attention,eager,compiled] [--out DIR]
Writes kernels-<gpu>.json and kernels-<gpu>.md (gpu: h100, h200, ...) into --out (default $OUT, else bench/results).

Batch 256 at context 2048 needs 68.7 GB of KV for 32 layers, which does not fit beside 16 GB of
weights on an 80 GB card: there the pool's layer dimension has stride 0 (all 32 layers read and write
one 2.15 GB layer of KV). Every layer still streams 2.15 GB from HBM (far past the 50 MB L2), so the
bytes per step are those of the real model. Batch 1 and 64 use a real 32-layer pool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid.attention.kv_dtype import as_bytes, is_float8, resolve_kv_dtype, to_kv  # noqa: E402
from rapid.attention.metadata import AttentionMetadata, kv_pool_shape  # noqa: E402
from rapid.model.config import ModelConfig, RopeConfig  # noqa: E402

HBM_BPS_BY_GPU = {"h100": 3.0e12, "h200": 4.3e12}  # device copy, bytes read + written, measured here
HBM_BPS = 3.0e12  # set in main() for the GPU found
MATMUL_FLOPS = 790e12
BLOCK = 16
LLAMA_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192),
)
SWEEP_TILES = [(32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3),
               (128, 4, 2), (128, 8, 2), (128, 8, 3), (16, 2, 4), (32, 2, 4), (64, 2, 3)]
SWEEP_PPS = [1, 2, 4, 8, 16]
log = logging.getLogger("bench.kernels")


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def ceilings() -> dict:
    """The card as found: a 1 GiB device copy and an 8192^3 bf16 matmul (random data)."""
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), 20)
    copy_bps = 2 * x.numel() * 2 / (ms / 1e3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, 20)
    x = y = a = b = None  # free them (the timed lambdas hold them)
    torch.cuda.empty_cache()
    return {"copy_TBps": round(copy_bps / 1e12, 3), "matmul_bf16_TFLOPs": round(2 * 8192**3 / (ms / 1e3) / 1e12, 1)}


# --------------------------------------------------------------------------- attention alone


def decode_case(B: int, ctx: int, cfg: ModelConfig, layers: int = 1, extra_blocks: int = 0, shared_layers: int = 0,
                gen: torch.Generator | None = None, layout: str = "nhd", kv_dtype: torch.dtype = torch.bfloat16):
    """A pool holding B sequences of ctx tokens in random blocks, and the decode metadata of their next step.

    layout "nhd": the engine's pool, [L, 2, NB, BS, KVH, D] in memory; "hnd": each kv head's block of BS tokens
    contiguous ([L, 2, NB, KVH, BS, D] in memory), handed over as the same [L, 2, NB, BS, KVH, D] view, which the
    kernels read through its strides."""
    nb = -(-ctx // BLOCK)
    num_blocks = B * nb + extra_blocks
    shape = kv_pool_shape(1 if shared_layers else layers, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    if layout not in ("nhd", "hnd"):
        raise ValueError(f"layout must be nhd or hnd, got {layout!r}")
    if layout == "hnd":  # [L, 2, NB, KVH, BS, D] in memory, seen as [L, 2, NB, BS, KVH, D]
        pool = torch.empty(shape[:3] + (shape[4], shape[3], shape[5]), device="cuda", dtype=kv_dtype).transpose(3, 4)
    else:
        pool = torch.empty(shape, device="cuda", dtype=kv_dtype)
    for i in range(shape[0]):  # normal values (a float8 pool: rounded, one layer at a time)
        layer = torch.empty(pool.shape[1:], device="cuda", dtype=torch.bfloat16).normal_(0, 1, generator=gen)
        as_bytes(pool[i]).copy_(as_bytes(to_kv(layer, kv_dtype)))
        del layer
    if shared_layers:  # layer dimension of stride 0: every layer is the same memory
        pool = pool.as_strided((shared_layers,) + tuple(pool.shape[1:]), (0,) + tuple(pool.stride()[1:]))
    perm = torch.randperm(B * nb, device="cuda", generator=gen).to(torch.int32)
    tables = perm.view(B, nb)
    pos = ctx - 1
    slots = tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.arange(B + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.full((B,), ctx, dtype=torch.int32, device="cuda"), block_tables=tables,
        num_decodes=B, max_seq_len=ctx, query_start_loc_host=list(range(B + 1)), seq_lens_host=[ctx] * B,
    )
    positions = torch.full((B,), pos, dtype=torch.int64, device="cuda")
    return pool, meta, positions


def kv_bytes(B: int, ctx: int, cfg: ModelConfig, layers: int = 1, itemsize: int = 2) -> int:
    return B * ctx * layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def graphed_ms(fns, reps: int = 10) -> float:
    """Per-call device time of fns (called in turn), captured in one CUDA graph: no launch gaps."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    ms = median_ms(g.replay, reps, warmup=2)
    del g
    return ms / len(fns)


def bench_attention(cfg: ModelConfig, shapes, sweep: bool, bound: int, layout: str = "nhd",
                    kv_dtype: torch.dtype = torch.bfloat16, dot_f16: bool = True) -> dict:
    """Decode attention of one layer inside a CUDA graph: Triton paged kernel (configs) vs SDPA on a
    contiguous cache. Calls rotate over several KV pools so that none is served from L2. layout: the pool's
    (decode_case); results of "hnd" are keyed with an "_hnd" suffix, of a float8 pool with "_<dtype>" (and
    "_bf16dot" for its dots in the queries' bf16 instead of float16)."""
    from rapid.attention.triton_backend import TritonAttention

    F = torch.nn.functional
    res = {}
    default = TritonAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1.0)
    keys = tuple(default.decode_config(1))  # the kernel's settings, as the backend names them
    for B, ctx in shapes:
        nbytes = kv_bytes(B, ctx, cfg, itemsize=kv_dtype.itemsize)
        sets = max(1, min(32, -(-256 * 2**20 // nbytes)))  # >= 256 MB touched per round
        cases = [decode_case(B, ctx, cfg, layout=layout, kv_dtype=kv_dtype) for _ in range(sets)]
        q = torch.randn(B, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        att = TritonAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
        att.tuning = att.float8_tuning = []  # the sweep sets the four settings itself
        att.float8_dot_f16 = default.float8_dot_f16 = dot_f16
        entry = {"kv_bytes": nbytes, "host_bound_max_seq_len": bound, "pools_rotated": sets, "configs": []}

        def run_cfg(c):
            for key in keys:
                setattr(att, key, c[key])
            fns = [(lambda p=p, m=m: att.decode(q, p[0], m.block_tables, m.seq_lens, bound, out)) for p, m, _ in cases]
            row = dict((key, c[key]) for key in keys)
            try:
                ms = graphed_ms(fns * max(1, 8 // sets))
            except Exception as e:  # e.g. out of shared memory for big tiles x stages
                torch.cuda.synchronize()
                return {**row, "error": f"{type(e).__name__}: {str(e)[:120]}"}
            return {**row, "splits": att.num_splits(B, bound, q.device), "us": round(ms * 1e3, 1),
                    "TBps": round(nbytes / (ms / 1e3) / 1e12, 3)}

        base = default.decode_config(B, is_float8(kv_dtype))  # what the engine uses for this batch
        entry["default"] = run_cfg(base)
        rows = [entry["default"]]
        if sweep and B > 1:
            # (tile_n, num_warps, num_stages): every tile with 2, 4 and 8 warps at 2-4 stages, the default included
            tiles = [(t, w, st) for t in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3, 4)]
            rows += [run_cfg(dict(tile_n=t, num_warps=w, num_stages=st, programs_per_sm=base["programs_per_sm"],
                                  unmasked_tiles=base["unmasked_tiles"])) for t, w, st in tiles]
            best = min((r for r in rows if "us" in r), key=lambda r: r["us"])
            rows += [run_cfg({**best, "programs_per_sm": p}) for p in (1, 2, 8, 16) if p != best["programs_per_sm"]]
            rows += [run_cfg({**best, "unmasked_tiles": not best["unmasked_tiles"]})]
        entry["configs"] = rows
        entry["best"] = min((r for r in rows if "us" in r), key=lambda r: r["us"])
        # baseline: SDPA over a contiguous [B, KVH, ctx, D] cache (what plain PyTorch does), same rotation
        kvs = [(torch.randn(B, cfg.num_kv_heads, ctx, cfg.head_dim, device="cuda", dtype=torch.bfloat16),
                torch.randn(B, cfg.num_kv_heads, ctx, cfg.head_dim, device="cuda", dtype=torch.bfloat16))
               for _ in range(sets)]
        q4 = q[:, :, None, :]
        fns = [(lambda kc=kc, vc=vc: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)) for kc, vc in kvs]
        ms = graphed_ms(fns * max(1, 8 // sets))
        entry["sdpa_contiguous"] = {"us": round(ms * 1e3, 1), "TBps": round(nbytes / (ms / 1e3) / 1e12, 3)}
        entry["roofline_us"] = round(nbytes / HBM_BPS * 1e6, 1)
        entry["kv_layout"] = layout
        suffix = ("_hnd" if layout == "hnd" else "") + ("" if kv_dtype == torch.bfloat16 else
                                                        "_" + str(kv_dtype).removeprefix("torch.")
                                                        + ("" if dot_f16 else "_bf16dot"))
        entry["kv_dtype"] = str(kv_dtype).removeprefix("torch.")
        res[f"B{B}_ctx{ctx}" + suffix] = entry
        d = entry["default"]
        print(f"attention B={B} ctx={ctx} (graphed): default {d.get('us')} us ({d.get('TBps')} TB/s), "
              f"best {entry['best']}, SDPA contiguous {entry['sdpa_contiguous']}", flush=True)
        cases = kvs = None  # free them (run_cfg holds them)
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- whole model


def build_8b(cfg: ModelConfig, max_positions: int):
    from rapid.attention.triton_backend import TritonAttention
    from rapid.model.llama import LlamaModel, RotaryEmbedding

    backend = TritonAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    with torch.device("meta"):
        model = LlamaModel(cfg, backend, max_positions)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions).to("cuda")
    return model.eval().requires_grad_(False), backend


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes a decode step reads: every parameter but the embedding table (only B rows of it are read)."""
    return 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)


def prefill_flops(cfg: ModelConfig, T: int) -> float:
    layer_params = cfg.num_params() - 2 * cfg.vocab_size * cfg.hidden_size - cfg.hidden_size
    attn = cfg.num_layers * 4.0 * cfg.num_heads * cfg.head_dim * T * (T + 1) / 2
    return 2.0 * layer_params * T + 2.0 * cfg.hidden_size * cfg.vocab_size + attn


def kernel_family(name: str) -> str:
    """The family a CUDA kernel's name belongs to, for the profiles' breakdowns."""
    low = name.lower()
    if "_decode_kernel" in name or "_reduce_kernel" in name:
        return "decode attention (triton)"
    if "_store_kv" in name or "_rope_store" in name:
        return "kv store (triton; with rope since session 35)"
    if "_paged_prefill_kernel" in name:
        return "prefill attention (triton paged)"
    if "_gemv_kernel" in name:
        return "gemv (triton)"
    if "_race_kernel" in name:
        return "sampler race (triton)"
    if "_partial_lse_kernel" in name or "_merge_kernel" in name:
        return "sampled logprob (triton)"
    if any(t in low for t in ("flash", "fmha", "cudnn", "attention")):
        return "prefill attention (sdpa)"
    if any(t in low for t in ("gemm", "nvjet", "xmma", "cutlass", "splitk")):
        return "gemm (cublas)"
    if name.startswith("triton_"):
        return "fused elementwise (inductor)"
    if "memcpy" in low or "memset" in low:
        return "copies"
    return "other (eager torch)"


def cuda_intervals(prof) -> list[tuple[float, float, str]]:
    """(start_us, end_us, kernel name) of every device activity a torch.profiler run saw, by start."""
    from torch.autograd import DeviceType

    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == DeviceType.CUDA)


def kernel_times_ms(intervals: list[tuple[float, float, str]], n: int) -> tuple[list, list]:
    """Device time per call (n calls profiled) by kernel family and by kernel name (90 characters), in ms, each
    largest first."""
    fams: dict[str, float] = {}
    names: dict[str, float] = {}
    for start, end, name in intervals:
        fam = kernel_family(name)
        fams[fam] = fams.get(fam, 0.0) + (end - start)
        names[name[:90]] = names.get(name[:90], 0.0) + (end - start)

    def ms(totals: dict[str, float]) -> list:
        return [(k, round(v / n / 1e3, 3)) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]

    return ms(fams), ms(names)


def profiled_intervals(fn, n: int) -> list[tuple[float, float, str]]:
    """The device activities of n calls of fn (torch.profiler, CUDA activity only), as cuda_intervals gives them."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return cuda_intervals(prof)


def profile_breakdown(fn, n: int = 3) -> dict:
    """Device time per step by kernel family (torch.profiler over n calls of fn), and the top kernels."""
    fn()
    intervals = profiled_intervals(fn, n)
    fams, names = kernel_times_ms(intervals, n)
    return {"families_ms": dict(fams), "kernel_sum_ms": round(sum(e - s for s, e, _ in intervals) / n / 1e3, 3),
            "top_kernels_ms": names[:12]}


def bench_decode(model, backend, cfg, variant: str, best: dict, apply_best: bool, max_model_len: int,
                 full_buckets: bool, refs: dict, profile: bool, blas_by_batch: bool = True,
                 only: set[str] | None = None, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    from rapid.compile.cuda_graphs import DecodeGraphRunner

    res = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    plans = [((1, 1024), (64, 1024)), ((256, 2048),)]
    if only:  # --decode-cases: the named cases, e.g. {"B1_ctx1024"}
        plans = [g for g in (tuple(c for c in group if f"B{c[0]}_ctx{c[1]}" in only) for group in plans) if g]
    keys = tuple(backend.decode_config(1))  # the kernel's settings, as the backend names them
    for group in plans:
        B0, ctx0 = group[-1]
        shared = B0 * ctx0 * 32 * 2 * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize > 40e9
        pool, _, _ = decode_case(B0, ctx0, cfg, layers=cfg.num_layers, shared_layers=cfg.num_layers if shared else 0,
                                 extra_blocks=0, gen=gen, kv_dtype=kv_dtype)
        for B, ctx in group:
            key = f"B{B}_ctx{ctx}"
            tuned = best.get(key) if apply_best else None
            tuning = "float8_tuning" if is_float8(kv_dtype) else "tuning"  # the backend's list for this pool
            saved_tuning = getattr(backend, tuning)
            if tuned:
                setattr(backend, tuning, [(B, {k: tuned[k] for k in keys})] + saved_tuning)
            # sequences of this case use B * ceil(ctx/16) random blocks of the pool
            nb = -(-ctx // BLOCK)
            perm = torch.randperm(pool.shape[2], device="cuda", generator=gen)[: B * nb].to(torch.int32)
            tables = perm.view(B, nb)
            pos = ctx - 1
            meta = AttentionMetadata(
                slot_mapping=tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK,
                query_start_loc=torch.arange(B + 1, dtype=torch.int32, device="cuda"),
                seq_lens=torch.full((B,), ctx, dtype=torch.int32, device="cuda"), block_tables=tables,
                num_decodes=B, max_seq_len=ctx,
            )
            ids = torch.randint(0, cfg.vocab_size, (B,), device="cuda", generator=gen)
            positions = torch.full((B,), pos, dtype=torch.int64, device="cuda")
            sizes = None if (full_buckets and B == 256) else [B]
            t0 = time.perf_counter()
            runner = DecodeGraphRunner(model, pool, 256 if sizes is None else B, BLOCK, max_model_len,
                                       capture_sizes=sizes, progress=False, blas_by_batch=blas_by_batch)
            capture_s = time.perf_counter() - t0
            assert runner.can_run(meta, B)

            def step():
                h = runner.run(ids, positions, meta)
                return model.compute_logits(h)

            hidden = runner.run(ids, positions, meta).float().clone()
            if key in refs:  # same inputs as the eager variant's: the outputs must agree
                ref = refs[key]
                err = ((hidden - ref).norm() / ref.norm()).item()
            else:
                refs[key], err = hidden, None
            step_ms = median_ms(step, 30, warmup=5)
            replay_ms = median_ms(runner.graphs[runner.bucket(B)].replay, 30, warmup=3)
            kv = kv_bytes(B, ctx, cfg, cfg.num_layers, kv_dtype.itemsize)
            roof_bytes = weight_bytes(cfg) + kv
            roof_ms = roof_bytes / HBM_BPS * 1e3
            res[key] = {
                "batch": B, "ctx": ctx, "step_ms": round(step_ms, 3), "graph_replay_ms": round(replay_ms, 3),
                "roofline_ms": round(roof_ms, 3), "share_of_roofline": round(roof_ms / step_ms, 3),
                "weight_bytes": weight_bytes(cfg), "kv_bytes": kv, "kv_dtype": str(kv_dtype).removeprefix("torch."),
                "kv_pool": f"stride-0 layers (one {kv / cfg.num_layers / 1e9:.2f} GB layer shared)" if shared
                else "real 32-layer pool",
                "graphs_captured": len(runner.graphs), "capture_s": round(capture_s, 2),
                "decode_config": backend.decode_config(B, is_float8(kv_dtype)),
                "splits": backend.num_splits(B, max_model_len, torch.device("cuda")),
                "rel_err_vs_eager_variant": None if err is None else round(err, 5),
            }
            if profile:
                try:
                    res[key]["profile_replay"] = profile_breakdown(runner.graphs[runner.bucket(B)].replay)
                except Exception as e:
                    res[key]["profile_replay"] = f"failed: {e!r}"[:200]
            print(f"decode [{variant}] {key}: {res[key]['step_ms']} ms/step (replay {res[key]['graph_replay_ms']}), "
                  f"roofline {res[key]['roofline_ms']} ms, share {res[key]['share_of_roofline']}, "
                  f"{len(runner.graphs)} graphs in {capture_s:.1f}s, cfg {res[key]['decode_config']}, "
                  f"err {err}", flush=True)
            if isinstance(res[key].get("profile_replay"), dict):
                print("   profile", res[key]["profile_replay"]["families_ms"], flush=True)
            setattr(backend, tuning, saved_tuning)
            runner = None  # free its graphs (step holds it)
            torch.cuda.empty_cache()
        del pool
        torch.cuda.empty_cache()
    return res


def bench_prefill(model, cfg, variant: str, pool, refs: dict, profile: bool) -> dict:
    res = {}
    gen = torch.Generator(device="cuda").manual_seed(2)
    for T in (2048, 8192):
        nb = -(-T // BLOCK)
        tables = torch.randperm(pool.shape[2], device="cuda", generator=gen)[:nb].to(torch.int32)[None]
        slots = (tables[0].long()[:, None] * BLOCK + torch.arange(BLOCK, device="cuda")).flatten()[:T]
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.tensor([0, T], dtype=torch.int32, device="cuda"),
            seq_lens=torch.tensor([T], dtype=torch.int32, device="cuda"), block_tables=tables, num_decodes=0,
            max_seq_len=T, query_start_loc_host=[0, T], seq_lens_host=[T],
        )
        ids = torch.randint(0, cfg.vocab_size, (T,), device="cuda", generator=gen)
        positions = torch.arange(T, device="cuda")

        def step():
            h = model(ids, positions, pool, meta)
            return model.compute_logits(h[-1:])

        key = f"T{T}"
        hidden = model(ids, positions, pool, meta).float()
        if key in refs:
            err = ((hidden - refs[key]).norm() / refs[key].norm()).item()
        else:
            refs[key], err = hidden, None
        del hidden
        ms = median_ms(step, 12 if T <= 2048 else 6, warmup=2)
        flops = prefill_flops(cfg, T)
        roof_ms = flops / MATMUL_FLOPS * 1e3
        res[key] = {
            "tokens": T, "ms": round(ms, 2), "tok_per_s": round(T / ms * 1e3), "TFLOPs": round(flops / ms / 1e9, 1),
            "roofline_ms": round(roof_ms, 2), "roofline_tok_per_s": round(T / roof_ms * 1e3),
            "share_of_roofline": round(roof_ms / ms, 3), "flops": flops,
            "rel_err_vs_eager_variant": None if err is None else round(err, 5),
        }
        if profile and T == 2048:
            try:
                res[key]["profile"] = profile_breakdown(step)
            except Exception as e:
                res[key]["profile"] = f"failed: {e!r}"[:200]
        print(f"prefill [{variant}] T={T}: {res[key]['tok_per_s']} tok/s ({res[key]['TFLOPs']} TFLOP/s), "
              f"roofline {res[key]['roofline_tok_per_s']} tok/s, share {res[key]['share_of_roofline']}, err {err}",
              flush=True)
        if isinstance(res[key].get("profile"), dict):
            print("   profile", res[key]["profile"]["families_ms"], flush=True)
    return res


# --------------------------------------------------------------------------- report

# the targets and the peers to beat (../shared/GPU_NOTES.md), by GPU. H100: plain PyTorch with cuBLAS, SDPA
# and one CUDA graph per shape; H200: transformers 5.17's compiled static-cache decode, in the same run as ours
TARGETS_BY_GPU = {
    "h100": {"decode B64_ctx1024 ms": 9.5, "decode B256_ctx2048 ms": 30.5, "prefill T2048 tok/s": 40000},
    "h200": {"decode B1_ctx1024 ms": 4.2, "decode B64_ctx1024 ms": 6.4, "decode B256_ctx2048 ms": 21.5,
             "prefill T2048 tok/s": 45000},
}
PEERS_BY_GPU = {
    "h100": {"decode B1_ctx1024": 7.06, "decode B64_ctx1024": 10.67, "decode B256_ctx2048": 32.2,
             "prefill T2048": 35.9e3, "prefill T8192": 33.1e3},
    "h200": {"decode B1_ctx1024": 7.16},
}


def _peer(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "" if value is None else fmt.format(value / scale)


def markdown(report: dict) -> str:
    gpu = report.get("gpu") or next((g for g in TARGETS_BY_GPU if g in report["device"].lower()), None)
    targets, peers = TARGETS_BY_GPU.get(gpu, {}), PEERS_BY_GPU.get(gpu, {})
    lines = [f"# Kernel benchmark: {report['device']}", "",
             f"`{report['command']}` — torch {report['torch']}, triton {report['triton']}; "
             f"ceilings as found: copy {report['ceilings'].get('copy_TBps')} TB/s, "
             f"bf16 matmul {report['ceilings'].get('matmul_bf16_TFLOPs')} TFLOP/s. Rooflines use "
             f"{report['roofline']['hbm_Bps'] / 1e12:.1f} TB/s and 790 TFLOP/s. Llama-3.1-8B shapes, random bf16 weights, medians of CUDA-event timings.", "",
             "| work | variant | measured | roofline | share | a peer (GPU_NOTES) | target |",
             "|---|---|---|---|---|---|---|"]
    for variant, v in report.get("model", {}).items():
        for key, r in v.get("decode", {}).items():
            tgt = targets.get(f"decode {key} ms")
            kvd = "" if r.get("kv_dtype", "bfloat16") == "bfloat16" else f", {r['kv_dtype']} KV"
            lines.append(f"| decode {key.replace('_', ', ')}{kvd} | {variant} | {r['step_ms']} ms/step "
                         f"| {r['roofline_ms']} ms "
                         f"| {r['share_of_roofline']:.0%} | {_peer(peers.get('decode ' + key), '{} ms')} | "
                         f"{'<= %s ms' % tgt if tgt else ''} |")
        for key, r in v.get("prefill", {}).items():
            tgt = targets.get(f"prefill {key} tok/s")
            lines.append(f"| prefill {r['tokens']} tokens | {variant} | {r['tok_per_s'] / 1e3:.1f}k tok/s "
                         f"({r['TFLOPs']} TFLOP/s) | {r['roofline_tok_per_s'] / 1e3:.1f}k tok/s | "
                         f"{r['share_of_roofline']:.0%} | {_peer(peers.get('prefill ' + key), '{:.1f}k tok/s', 1e3)} | "
                         f"{'>= %dk tok/s' % (tgt // 1000) if tgt else ''} |")
    lines += ["", "Decode attention alone (one layer, paged, inside a CUDA graph, host bound max_seq_len as in the "
              "decode graphs):", "",
              "| shape | Triton default | best of sweep | SDPA, contiguous cache | roofline |", "|---|---|---|---|---|"]
    for key, e in report.get("attention", {}).items():
        d, b = e.get("default", {}), e.get("best")
        best = (f"{b['us']} us ({b['TBps']} TB/s) tile {b['tile_n']} w{b['num_warps']} s{b['num_stages']} "
                f"pps {b['programs_per_sm']}{' unmasked' if b.get('unmasked_tiles') else ''}") if b else ""
        lines.append(f"| {key} | {d.get('us')} us ({d.get('TBps')} TB/s) | {best} | "
                     f"{e['sdpa_contiguous']['us']} us ({e['sdpa_contiguous']['TBps']} TB/s) | {e['roofline_us']} us |")
    prof = []
    for variant, v in report.get("model", {}).items():
        for key, r in list(v.get("decode", {}).items()) + list(v.get("prefill", {}).items()):
            pr = r.get("profile_replay") or r.get("profile")
            if isinstance(pr, dict):
                fam = ", ".join(f"{k} {ms} ms" for k, ms in pr["families_ms"].items())
                prof.append(f"| {variant} {key} | {pr['kernel_sum_ms']} ms | {fam} |")
    if prof:
        lines += ["", "Where the device time goes (torch.profiler, kernel time per step by family):", "",
                  "| case | kernels | by family |", "|---|---|---|"] + prof
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="sweep decode kernel configs")
    ap.add_argument("--apply-best", action="store_true", help="use the sweep's best config per decode shape")
    ap.add_argument("--kv-layouts", default="nhd",
                    help="decode attention's pool layouts: nhd (the engine's) and/or hnd")
    ap.add_argument("--attention-shapes", default="1x1024,64x1024,256x2048", help="decode attention cases, BxCTX")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: attention,eager,compiled")
    ap.add_argument("--compile-dynamic", default="true", choices=["true", "tokens"],
                    help="model.compile_pieces(dynamic=...): true = every size symbolic; tokens = only T symbolic")
    ap.add_argument("--max-model-len", type=int, default=4096, help="the graphs' host bound of the context")
    ap.add_argument("--decode-only", action="store_true", help="no prefill cases in any variant")
    ap.add_argument("--decode-cases", default="", help="comma list of decode cases to run, e.g. B1_ctx1024")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e5m2"],
                    help="the decode cases' KV pool: auto (bf16, the model's) or float8 (the engine's kv_cache_dtype)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import triton

    global HBM_BPS
    name = torch.cuda.get_device_name()
    gpu = next((g for g in HBM_BPS_BY_GPU if g in name.lower()), "gpu")
    HBM_BPS = HBM_BPS_BY_GPU.get(gpu, HBM_BPS)
    skip = set(filter(None, args.skip.split(",")))
    cfg = LLAMA_8B
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python3 bench/kernels.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
        "gpu": gpu,
        "torch": torch.__version__, "triton": triton.__version__, "model": {}, "errors": [],
        "roofline": {"hbm_Bps": HBM_BPS, "matmul_flops": MATMUL_FLOPS,
                     "decode": f"(weights except embedding + KV read) / {HBM_BPS:.1e} B/s",
                     "prefill": "(2*layer params*T + 2*hidden*vocab + causal attention FLOPs) / 790e12 FLOP/s"},
        "params": cfg.num_params(), "compile_dynamic": args.compile_dynamic, "kv_cache_dtype": args.kv_cache_dtype,
    }

    def save():
        (out_dir / f"kernels-{gpu}.json").write_text(json.dumps(report, indent=1))
        (out_dir / f"kernels-{gpu}.md").write_text(markdown(report))

    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, torch.bfloat16)
    torch.manual_seed(0)
    report["ceilings"] = ceilings()
    print("ceilings", report["ceilings"], flush=True)
    best = {}
    if "attention" not in skip:
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.attention_shapes.split(",")]
            report["attention"] = {}
            for layout in args.kv_layouts.split(","):
                for dot_f16 in (True, False) if args.kv_cache_dtype != "auto" else (True,):
                    report["attention"].update(bench_attention(cfg, shapes, args.sweep, args.max_model_len, layout,
                                                               kv_dtype, dot_f16))
            # a sweep winner replaces the default only where it is more than 1% faster
            # (a float8 pool's entries are keyed with its dtype: those with float16 dots, the engine's, apply)
            pool_suffix = "" if args.kv_cache_dtype == "auto" else "_" + str(kv_dtype).removeprefix("torch.")
            best = {k.removesuffix(pool_suffix): e["best"] for k, e in report["attention"].items()
                    if e.get("best") and e["best"]["us"] < 0.99 * e["default"].get("us", 1e9)}
            report["applied_best"] = best if args.apply_best else {}
        except Exception as e:
            traceback.print_exc()
            report["errors"].append(f"attention: {e!r}"[:300])
        save()
    refs: dict = {}
    with torch.inference_mode():
        model, backend = build_8b(cfg, max_positions=max(args.max_model_len, 8192) + 16)
        default_sdpa = backend.prefill_sdpa_backends  # flash first (see TritonAttention)
        variants = ("eager", "compiled", "compiled-cublas-decode", "compiled-cudnn-prefill", "compiled-paged-prefill")
        for variant in variants:
            if variant in skip or (variant.startswith("compiled") and "compiled" in skip):
                continue
            t0 = time.perf_counter()
            try:
                if variant == "compiled":
                    model.compile_pieces(dynamic=True if args.compile_dynamic == "true" else "tokens")
                    model.use_gemv(True)  # as rapid.compile.prepare_model does on CUDA
                if variant == "compiled-cublas-decode":  # decode only: cuBLAS for every batch (no GEMV, no cuBLASLt)
                    model.use_gemv(False)
                if variant == "compiled-cudnn-prefill":  # prefill only: SDPA with cuDNN first, then flash
                    backend.set_prefill_attention("cudnn")
                if variant == "compiled-paged-prefill":  # prefill only: the Triton paged kernel, no gather
                    backend.set_prefill_attention("paged")
                v = report["model"].setdefault(variant, {})
                if not (variant.endswith("-decode") or args.decode_only):
                    pool, _, _ = decode_case(1, 8192, cfg, layers=cfg.num_layers, extra_blocks=0)
                    v["prefill"] = bench_prefill(model, cfg, variant, pool, refs, profile=variant != "eager")
                    del pool
                    torch.cuda.empty_cache()
                    save()
                if not variant.endswith("-prefill"):
                    v["decode"] = bench_decode(model, backend, cfg, variant, best, args.apply_best,
                                               args.max_model_len, full_buckets=variant == "compiled", refs=refs,
                                               profile=variant.startswith("compiled"),
                                               blas_by_batch=variant == "compiled",
                                               only=set(filter(None, args.decode_cases.split(","))),
                                               kv_dtype=kv_dtype)
                v["wall_s"] = round(time.perf_counter() - t0, 1)
            except Exception as e:
                traceback.print_exc()
                report["errors"].append(f"{variant}: {e!r}"[:300])
            backend.set_prefill_attention("flash")
            backend.prefill_sdpa_backends = default_sdpa
            model.use_gemv(variant != "eager")
            save()
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

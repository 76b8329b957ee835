"""What a whole-graph prefill/mixed step costs at each token count: the curve the token buckets are chosen from.

A step of T tokens replays the graph of the smallest bucket >= T, so it pays for the bucket's tokens. This captures
one whole CUDA graph (rapid/compile/full_graph.py) per size in a fine list and times each, with CUDA events after
warm-up (median of --reps), for batches of exactly that size:
  * `--decodes D` decode rows at context `--ctx` (each reading its own KV blocks) plus one fresh prompt chunk of T - D
    tokens (D = 0: a prompt alone);
then reports what padding costs on this curve with the x1.5/x2 buckets and with the engine's candidates pruned
as FullGraphRunner prunes them (sizes a larger one beats dropped).

    python3 bench/graph_buckets.py --model /tmp/llama8b --decodes 0,128 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid.attention.metadata import AttentionMetadata, allocate_kv_pool  # noqa: E402
from rapid.attention.triton_backend import TritonAttention  # noqa: E402
from rapid.compile import warm_up  # noqa: E402
from rapid.compile.buckets import PRUNE_MARGIN, candidate_buckets, token_buckets, undominated  # noqa: E402
from rapid.compile.full_graph import FullGraphRunner  # noqa: E402
from rapid.model.config import ModelConfig  # noqa: E402
from rapid.model.loader import build_model  # noqa: E402

BLOCK = 16


def fine_sizes(max_tokens: int) -> list[int]:
    """16..1024 step 16, then step 64 to 2048, then step 256: the sizes whose cost is measured."""
    sizes = list(range(16, 1025, 16)) + list(range(1088, 2049, 64)) + list(range(2304, max_tokens + 1, 256))
    return [s for s in sizes if s <= max_tokens]


def mixed_batch(T: int, decodes: int, ctx: int, device: torch.device, ids: str = "random", vocab: int = 32000):
    """`decodes` one-token rows at context `ctx` on their own blocks, then one fresh chunk of T - decodes tokens, each
    row writing its keys and values at its position, as the engine's step does. ids "random" (seeded): token ids as
    a prompt's; "zeros": every row the same token, as this script fed before session 32's call 3, whose matmuls
    run faster on identical rows (session 32: a 2048-token prompt's step took 42.7 ms with them, 49.4 without)."""
    chunk = T - decodes
    ctx_blocks, chunk_blocks = -(-ctx // BLOCK), -(-chunk // BLOCK)
    lens = [ctx] * decodes + [chunk]
    q = [1] * decodes + [chunk]
    starts = [0]
    for n in q:
        starts.append(starts[-1] + n)
    tables = torch.zeros(len(lens), max(ctx_blocks, chunk_blocks), dtype=torch.int32, device=device)  # [S, W]
    tables[:decodes, :ctx_blocks] = torch.arange(decodes * ctx_blocks, dtype=torch.int32,
                                                 device=device).view(decodes, ctx_blocks)
    tables[decodes, :chunk_blocks] = torch.arange(chunk_blocks, dtype=torch.int32, device=device) + decodes * ctx_blocks
    positions = torch.cat([torch.full((decodes,), ctx - 1, device=device), torch.arange(chunk, device=device)])  # [T]
    row_seq = torch.cat([torch.arange(decodes, device=device), torch.full((chunk,), decodes, device=device)])  # [T]
    slots = tables[row_seq, positions // BLOCK].long() * BLOCK + positions % BLOCK  # [T]
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=tables,
        num_decodes=decodes, max_seq_len=max(lens), query_start_loc_host=starts, seq_lens_host=lens)
    if ids == "zeros":
        token_ids = torch.zeros(T, dtype=torch.int64, device=device)
    else:
        gen = torch.Generator(device=device).manual_seed(T * 1000 + decodes)
        token_ids = torch.randint(0, vocab, (T,), generator=gen, device=device)
    return token_ids, positions, meta


def time_step(runner: FullGraphRunner, batch, reps: int) -> float:
    """Median ms of one step (load into the static buffers + replay, or the body run eagerly with --eager), CUDA
    events, after 3 warm-up steps."""
    for _ in range(3):
        runner.run(*batch)
    times = []
    if not torch.cuda.is_available():  # a CPU dry run (TRITON_INTERPRET=1): wall time of the eager body
        for _ in range(reps):
            t = time.perf_counter()
            runner.run(*batch)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.run(*batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_step(runner: FullGraphRunner, batch, steps: int = 10) -> dict:
    """One size's kernels by family and the device's gaps between them (torch.profiler, CUDA activity only)."""
    from kernels import profiled_intervals  # bench/: this script's own folder
    from step_profile import device_gaps, kernels_by_family

    intervals = profiled_intervals(lambda: runner.run(*batch), steps)
    return {"kernels": kernels_by_family(intervals, steps), "device": device_gaps(intervals, steps)}


def padding_cost(curve: dict[int, float], buckets: list[int]) -> dict | None:
    """For each measured size T (a batch of T tokens), the bucket it would replay and that bucket's cost over
    T's own: mean and worst, over sizes 128 and up (where prompts chunks sit). None when --sizes measured none."""
    ratios = {}
    for T, ms in curve.items():
        b = next((b for b in buckets if b >= T), None)
        if b is not None and b in curve and T >= 128:
            ratios[T] = curve[b] / ms
    if not ratios:
        return None
    worst = max(ratios, key=ratios.get)
    return {"buckets": buckets, "mean_ratio": round(statistics.mean(ratios.values()), 4),
            "worst_ratio": round(ratios[worst], 4), "worst_at_tokens": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (config.json; random weights)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--decodes", default="0,128", help="decode rows beside the chunk, comma-separated")
    ap.add_argument("--ctx", type=int, default=1024, help="context of each decode row")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sizes", default=None, help="comma-separated token counts (default: fine_sizes)")
    ap.add_argument("--eager", action="store_true",
                    help="run each step's body without capturing it (its compiled pieces, launched one by one)")
    ap.add_argument("--profile", action="store_true",
                    help="also each size's kernels by family and the device's gaps (torch.profiler, 10 steps)")
    ap.add_argument("--ids", choices=("random", "zeros"), default="random",
                    help="token ids: random (a prompt's) or zeros (identical rows: faster matmuls)")
    ap.add_argument("--warm-tokens", type=int, default=None,
                    help="the warm-up's first forward, whose size the fused kernels are tuned on (default: "
                         "--max-tokens, as the engine does)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()  # else a dry run of the script on a tiny model: TRITON_INTERPRET=1, no graphs
    dev, dtype = torch.device("cuda" if gpu else "cpu"), torch.bfloat16 if gpu else torch.float32
    cfg = ModelConfig.from_folder(args.model)
    decodes = [int(d) for d in args.decodes.split(",")]
    sizes = [int(t) for t in args.sizes.split(",")] if args.sizes else fine_sizes(args.max_tokens)
    backend = TritonAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5,
                              prefill_attention="paged")
    model = build_model(args.model, backend, dtype, dev, load_format="dummy")
    rows = max(decodes) + 1
    per_seq = -(-max(args.ctx, args.max_tokens) // BLOCK)  # the widest block table
    blocks = max(decodes) * -(-args.ctx // BLOCK) + -(-args.max_tokens // BLOCK)
    pool = allocate_kv_pool(cfg, blocks, BLOCK, dtype, dev)  # [L, 2, NB, BS, KVH, D]
    if gpu:
        model.compile_pieces()
        warm_up(model, pool, args.warm_tokens or args.max_tokens, cfg.max_position_embeddings)
    runner = FullGraphRunner(model, pool, args.max_tokens, rows, per_seq * BLOCK, BLOCK, sizes=sizes,
                             capture=gpu and not args.eager)
    curves = {}
    for d in decodes:
        curves[d] = {T: round(time_step(runner, mixed_batch(T, d, args.ctx, dev, args.ids, cfg.vocab_size),
                                        args.reps), 4) for T in sizes if T > d}
        print(f"decodes {d}: " + ", ".join(f"{T}:{ms:.2f}" for T, ms in curves[d].items()), flush=True)
    profiles = {f"{d}+{T - d}": profile_step(runner, mixed_batch(T, d, args.ctx, dev, args.ids, cfg.vocab_size))
                for d in decodes for T in sizes if T > d} if args.profile and gpu else {}
    coarse = token_buckets(args.max_tokens)  # the x1.5/x2 buckets (piecewise graphs; whole graphs before session 19)
    pruned = {d: undominated({T: c[T] for T in candidate_buckets(args.max_tokens) if T in c}, PRUNE_MARGIN)
              for d, c in curves.items()}
    result = {
        "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(), "model": cfg.__dict__ if hasattr(cfg, "__dict__") else str(cfg),
        "method": f"{'each step eagerly (--eager)' if args.eager else 'one whole CUDA graph per size'}; median of "
                  f"{args.reps} steps after 3, CUDA events; decode rows at "
                  f"context {args.ctx}, one fresh chunk, KV written, token ids {args.ids}",
        "capture_s": round(runner.capture_s, 1),
        "ms_by_decodes_and_tokens": {str(d): {str(T): ms for T, ms in c.items()} for d, c in curves.items()},
        "coarse_buckets_padding": {str(d): padding_cost(c, coarse) for d, c in curves.items()},
        # the candidates pruned on this same curve (so optimistic: a size's own noise can keep or drop it)
        "pruned_candidates_padding": {str(d): padding_cost(c, pruned[d]) for d, c in curves.items()},
        "profiles_by_decodes_and_chunk": profiles,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph-buckets.json").write_text(json.dumps(result, indent=1, default=str))
    for key in ("coarse_buckets_padding", "pruned_candidates_padding"):
        for d, c in result[key].items():
            if c is None:
                continue
            print(f"{key}, decodes {d}: {len(c['buckets'])} buckets cost {c['mean_ratio']:.3f}x a step's own size on "
                  f"average, {c['worst_ratio']:.3f}x at worst ({c['worst_at_tokens']} tokens)")


if __name__ == "__main__":
    main()

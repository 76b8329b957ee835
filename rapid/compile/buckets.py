"""Token buckets of the prefill/mixed CUDA graphs (plain Python: the simulator reads them too).

A batch of T tokens replays the graph of the smallest bucket >= T and pays for the bucket's tokens. Piecewise
graphs (one per layer piece and bucket) use the coarse x1.5/x2 steps of `token_buckets`; whole graphs (one per
bucket) capture the fine `candidate_buckets`, time each, and keep the `undominated` ones (compile/full_graph.py).
"""

from __future__ import annotations

import math

PRUNE_MARGIN = 0.02  # whole graphs: a bucket is dropped only when a larger one is over 2% cheaper (noise stays out)


def token_buckets(max_tokens: int, smallest: int = 16) -> list[int]:
    """16, 32, 64, 128, 256, 384, 512, 768, 1024, ... (x1.5 / x2 steps), ending exactly at max_tokens."""
    out, t = [], smallest
    while t < max_tokens:
        out.append(t)
        if t >= 256 and t * 3 // 2 < max_tokens:
            out.append(t * 3 // 2)
        t *= 2
    return out + [max_tokens]


def candidate_buckets(max_tokens: int) -> list[int]:
    """Token sizes whose graphs are captured and timed: 16, 32, 48, 64, 96, 128, then every 32 tokens to 1024,
    every 128 to 2048, every 256 to 4096 and every 512 beyond, ending exactly at max_tokens."""
    out, t = [16, 32, 48, 64, 96, 128], 128
    for step, upto in ((32, 1024), (128, 2048), (256, 4096), (512, max_tokens)):
        while t + step <= min(upto, max_tokens):
            t += step
            out.append(t)
    return [s for s in out if s < max_tokens] + [max_tokens]


def undominated(ms_by_size: dict[int, float], margin: float = 0.0) -> list[int]:
    """The sizes that no larger size beats by more than `margin` (a share of the size's own time; the largest
    always stays): padding a batch to the next one kept never costs more than the size skipped (1 + margin)."""
    kept, best = [], math.inf
    for size in sorted(ms_by_size, reverse=True):
        if best >= (1 - margin) * ms_by_size[size]:
            kept.append(size)
            best = min(best, ms_by_size[size])
    return sorted(kept)

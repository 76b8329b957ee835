"""Piecewise CUDA graphs for prefill and mixed (hybrid) batches, in the manner of vLLM V1.

A mixed batch (decodes + prefill chunks) has a structure that changes every step, so the attention
calls (with rope) run eagerly; everything between two attention calls (o_proj, MLP, norms, next layer's qkv:
the pieces of LlamaModel.forward, compiled) is one CUDA graph per token-count bucket. A step is then
L + 1 graph replays and L eager attention calls instead of thousands of kernel launches, so the host
keeps ahead of the GPU even for small chunks. Tokens are padded to the bucket; the graphs compute the
padding rows, but attention gets only the real rows (and the step's own metadata), so they write no KV and never
touch real rows.

Every piece reads and writes the same static buffers (x, q, k, v, attention output), which live
outside the graph pool; each graph's temporaries are dead when it ends, so all graphs share one pool.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from rapid.attention.metadata import AttentionMetadata
from rapid.compile.buckets import token_buckets
from rapid.compile.cuda_graphs import capture_pieces

logger = logging.getLogger(__name__)


class PiecewiseGraphRunner:
    """One CUDA graph per piece of LlamaModel.forward (model.pieces) and token bucket; attention eager.

    Graph 0: embedding + layer 0's pre-attention; graph i (1 <= i < L): layer i-1's post-attention with
    layer i's pre-attention; graph L: the last post-attention with the final norm. The graphs hold the
    model's pieces as they are at capture: compile them first (model.compile_pieces(); prepare_model does).
    """

    def __init__(self, model, kv_pool: torch.Tensor, max_tokens: int, *, progress: bool = True):
        self.model = model
        self.kv_pool = kv_pool
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        cfg = model.config
        dev, dtype = kv_pool.device, model.embed_tokens.weight.dtype
        n = self.max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.x = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=dev)  # the residual stream
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)
        self.k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
        self.v = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
        self.attn = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)
        self.out = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.capture_s = 0.0
        self._capture(progress)

    # ----------------------------------------------------------------- the pieces (static buffers)
    def _store(self, T: int, x, q, k, v) -> None:
        self.x[:T].copy_(x)  # [T, hidden]
        self.q[:T].copy_(q)  # [T, H, D]
        self.k[:T].copy_(k)  # [T, KVH, D]
        self.v[:T].copy_(v)

    def _first(self, T: int) -> None:
        m = self.model
        x = m.embed_tokens(self.input_ids[:T])  # [T, hidden]
        self._store(T, x, *m.pieces.pre(m.layers[0], x))

    def _middle(self, T: int, i: int) -> None:
        """Layer i-1's post-attention work fused with layer i's pre-attention work."""
        m = self.model
        self._store(T, *m.pieces.post_pre(m.layers[i - 1], self.x[:T], self.attn[:T], m.layers[i]))

    def _last(self, T: int) -> None:
        m = self.model
        self.out[:T].copy_(m.pieces.post_norm(m.layers[-1], self.x[:T], self.attn[:T], m.norm))

    def _pieces(self, T: int):
        L = len(self.model.layers)
        return [lambda: self._first(T)] + [lambda i=i: self._middle(T, i) for i in range(1, L)] + [lambda: self._last(T)]

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        from tqdm import tqdm

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for T in tqdm(sorted(self.buckets, reverse=True), desc="capturing prefill/mixed CUDA graphs",
                      disable=not progress, leave=False):
            self.graphs[T] = capture_pieces(self._pieces(T), pool)
            logger.info("piecewise graphs for %d tokens captured (%.1fs so far)", T, time.perf_counter() - t0)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d piecewise CUDA graphs (%d token buckets up to %d) in %.1fs",
                    sum(len(g) for g in self.graphs.values()), len(self.buckets), self.max_tokens, self.capture_s)

    # ----------------------------------------------------------------- running
    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return meta.num_prefills > 0 and num_tokens <= self.max_tokens

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Prefill or mixed batch -> hidden [T, hidden] (a view of a static buffer, valid until the next run)."""
        T = input_ids.shape[0]
        b = self.buckets[bisect.bisect_left(self.buckets, T)]
        self.input_ids[:T].copy_(input_ids, non_blocking=True)
        self.positions[:T].copy_(positions, non_blocking=True)
        graphs = self.graphs[b]
        meta = self.model.layers[0].self_attn.backend.plan(meta)  # once for every layer's attention call
        rope = self.model.rotary.at(self.positions[:T])
        graphs[0].replay()
        for i, layer in enumerate(self.model.layers):  # attention (with rope) eager between the graphs
            self.attn[:T].copy_(layer.self_attn.attend(self.q[:T], self.k[:T], self.v[:T], self.kv_pool, meta, rope))
            graphs[i + 1].replay()
        return self.out[:T]

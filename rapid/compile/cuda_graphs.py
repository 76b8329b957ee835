"""CUDA graphs for decode steps, and torch.compile for the non-attention parts of the model.

DecodeGraphRunner captures one graph of the whole model forward per batch-size bucket
(1, 2, 4, 8, then every multiple of 8 up to max_num_seqs). Every graph reads the same static
input buffers (token ids, positions, slot mapping, context lengths, block tables) and all graphs
share one memory pool. `run` copies a live decode batch into the buffers, pads it to the next
bucket (padding rows: slot -1, so they write no KV, and context length 0, so they read none), replays,
and returns the first rows of the graph's output buffer: a view, valid until the next replay.

The attention backend must be capturable (no host syncs, a grid fixed by host values): it says so
with a `cuda_graph_capturable = True` attribute (TritonAttention does). During capture the metadata's
max_seq_len is held at max_model_len, so the backend's launch shapes do not depend on live lengths.

compile_prefill(model) runs the model's non-attention work through torch.compile'd pieces (norm + qkv
projection + rope before each attention call; o_proj + residual + norm + MLP after it, fused with the
next layer's norm + qkv + rope); the attention backend runs between them, outside any compiled region.
It turns about 40 small kernels per layer into a handful. Apply it before building a DecodeGraphRunner
so the graphs capture the compiled kernels. Measured gain on an H100 at Llama-3.1-8B shapes
(bench/results/kernels-h100.md): prefill of 2048 tokens 31.5k -> 37.9k tok/s with every size symbolic,
41.4k with only the token count symbolic (dynamic="tokens", the default; cuDNN SDPA); decode steps (CUDA
graphs) batch 1 8.2 -> 6.2 ms, batch 64 12.5 -> 9.5 ms, batch 256 34.8 -> 31.1 ms.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rapid.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... (step 8), the last one >= max_num_seqs."""
    candidates = [1, 2, 4, 8] + list(range(16, max(max_num_seqs, 1) + 8, 8))
    below = [c for c in candidates if c < max_num_seqs]
    return below + [next(c for c in candidates if c >= max(max_num_seqs, 1))]


class DecodeGraphRunner:
    def __init__(self, model, kv_pool: torch.Tensor, max_num_seqs: int, block_size: int, max_model_len: int,
                 *, capture_sizes: list[int] | None = None, progress: bool = True):
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = max_model_len // block_size + 1
        backend = model.layers[0].self_attn.backend if len(model.layers) else None
        self.sizes: list[int] = sorted(set(capture_sizes or bucket_sizes(max_num_seqs)))
        if not getattr(backend, "cuda_graph_capturable", False):
            logger.warning("attention backend %r is not CUDA-graph capturable: decode runs eagerly",
                           getattr(backend, "name", type(backend).__name__))
            self.sizes = []
        self.max_bs = self.sizes[-1] if self.sizes else 0
        dev = kv_pool.device
        n = max(self.max_bs, 1)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_s = 0.0
        if self.sizes:
            self._capture(progress)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            num_decodes=b,
            max_seq_len=self.max_model_len,  # a host bound, constant across replays
        )

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        from tqdm import tqdm

        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)  # warm-up/capture rows read one token of block 0 and write nothing (slot -1)
        sizes = sorted(self.sizes, reverse=True)  # largest first: smaller graphs reuse its pool memory
        for b in tqdm(sizes, desc="capturing decode CUDA graphs", disable=not progress, leave=False):
            meta = self._meta(b)
            ids, pos = self.input_ids[:b], self.positions[:b]
            for _ in range(2):  # compile Triton/Inductor kernels for this shape outside the capture
                self.model(ids, pos, self.kv_pool, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(ids, pos, self.kv_pool, meta)
            self.graphs[b], self.outputs[b] = graph, out
        torch.cuda.synchronize()
        self.seq_lens.fill_(0)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d, max_model_len %d) in %.1fs",
                    len(sizes), self.sizes[0], self.max_bs, self.max_model_len, self.capture_s)

    def can_run(self, meta: AttentionMetadata, num_seqs: int) -> bool:
        return (
            self.max_bs > 0
            and meta.num_prefills == 0
            and 0 < num_seqs <= self.max_bs
            and meta.num_decodes == num_seqs
            and meta.slot_mapping.shape[0] == num_seqs
            and meta.max_seq_len <= self.max_model_len
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def bucket(self, num_seqs: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode-only batch -> hidden [num_seqs, hidden] (a view of the graph's output buffer)."""
        n = meta.num_seqs
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables, non_blocking=True)
        if b > n:  # padding rows: no KV write, no KV read (stale ids/positions are valid indices)
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(0)
        self.graphs[b].replay()
        return self.outputs[b][:n]


# --------------------------------------------------------------------------- torch.compile


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _pre_attention(x, positions, cos_sin, ln_w, qkv_w, qkv_b, q_norm_w, k_norm_w, eps: float,
                   num_heads: int, num_kv_heads: int, head_dim: int):
    """input norm + fused qkv projection (+ Qwen3 qk-norm) + rope -> q [T,H,D], k, v [T,KVH,D]."""
    T = x.shape[0]
    qkv = F.linear(_rms(x, ln_w, eps), qkv_w, qkv_b)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(T, num_heads, head_dim)
    k = k.reshape(T, num_kv_heads, head_dim)
    v = v.reshape(T, num_kv_heads, head_dim)
    if q_norm_w is not None:
        q, k = _rms(q, q_norm_w, eps), _rms(k, k_norm_w, eps)
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _post_attention(x, attn, o_w, ln_w, gate_up_w, down_w, eps: float, intermediate: int):
    """o_proj + residual, post-attention norm, SwiGLU MLP + residual."""
    x = x + F.linear(attn.flatten(1), o_w)
    gate, up = F.linear(_rms(x, ln_w, eps), gate_up_w).split(intermediate, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def _post_pre(x, attn, o_w, ln2_w, gate_up_w, down_w, eps2: float, intermediate: int,
              positions, cos_sin, ln_w, qkv_w, qkv_b, q_norm_w, k_norm_w, eps: float,
              num_heads: int, num_kv_heads: int, head_dim: int):
    """Layer i's post-attention work and layer i+1's pre-attention work in one compiled region, so the
    residual add is fused with the next norm (one kernel, one pass over x, fewer graph nodes)."""
    x = _post_attention(x, attn, o_w, ln2_w, gate_up_w, down_w, eps2, intermediate)
    q, k, v = _pre_attention(x, positions, cos_sin, ln_w, qkv_w, qkv_b, q_norm_w, k_norm_w, eps,
                             num_heads, num_kv_heads, head_dim)
    return x, q, k, v


def _final_norm(x, w, eps: float):
    return _rms(x, w, eps)


# Positions of the arguments whose dim 0 is the token count T, per compiled piece.
_TOKEN_ARGS = {"pre": (0, 1), "post": (0, 1), "post_pre": (0, 1, 8), "norm": (0,)}
_PIECES = {"pre": _pre_attention, "post": _post_attention, "post_pre": _post_pre, "norm": _final_norm}


def _own_copy(fn):
    """fn with a fresh code object: Dynamo keeps its compiled entries (and counts its recompile limit) per
    code object, so each compile_prefill call gets caches of its own instead of sharing one process-wide."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compile_piece(name: str, dynamic: bool | str):
    """torch.compile of one piece.

    dynamic=True: every dimension symbolic. dynamic="tokens": only T is symbolic (the other sizes are
    compile-time constants, so the fused kernels index with constant divisors); T == 1 gets its own graph.
    """
    fn = _own_copy(_PIECES[name])
    if dynamic != "tokens":
        return torch.compile(fn, dynamic=bool(dynamic), fullgraph=True)
    compiled = torch.compile(fn, dynamic=None, fullgraph=True)
    token_args = _TOKEN_ARGS[name]

    def call(*args):
        for i in token_args:
            if args[i].shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(args[i], 0)
        return compiled(*args)

    return call


@dataclass(frozen=True)
class CompiledPieces:
    """The four compiled functions of one compile_prefill call (see _compile_piece)."""

    pre: object
    post: object
    post_pre: object
    norm: object

    @classmethod
    def build(cls, dynamic: bool | str) -> "CompiledPieces":
        if dynamic not in (True, False, "tokens"):
            raise ValueError(f"dynamic must be True, False or 'tokens', got {dynamic!r}")
        return cls(*(_compile_piece(name, dynamic) for name in ("pre", "post", "post_pre", "norm")))


def _pre_args(layer):
    a = layer.self_attn
    return (layer.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias,
            None if a.q_norm is None else a.q_norm.weight, None if a.k_norm is None else a.k_norm.weight,
            layer.input_layernorm.eps, a.num_heads, a.num_kv_heads, a.head_dim)


def _post_args(layer):
    a, mlp = layer.self_attn, layer.mlp
    return (a.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight,
            layer.post_attention_layernorm.eps, mlp.intermediate_size)


def _layer_forward(layer, pre, post, x, positions, rotary, kv_pool, meta):
    a = layer.self_attn
    q, k, v = pre(x, positions, rotary.cos_sin, *_pre_args(layer))
    out = a.backend.forward(q, k, v, kv_pool[a.layer_idx], meta)  # eager: outside the compiled regions
    return post(x, out, *_post_args(layer))


def _model_forward(model, pre, post, post_pre, norm, input_ids, positions, kv_pool, meta):
    """LlamaModel.forward with layer i's post-attention and layer i+1's pre-attention fused."""
    x = model.embed_tokens(input_ids)
    layers = model.layers
    cos_sin = model.rotary.cos_sin
    q, k, v = pre(x, positions, cos_sin, *_pre_args(layers[0]))
    for i, layer in enumerate(layers):
        a = layer.self_attn
        out = a.backend.forward(q, k, v, kv_pool[a.layer_idx], meta)  # eager: outside the compiled regions
        if i + 1 < len(layers):
            x, q, k, v = post_pre(x, out, *_post_args(layer), positions, cos_sin, *_pre_args(layers[i + 1]))
        else:
            x = post(x, out, *_post_args(layer))
    return norm(x, model.norm.weight, model.norm.eps)


def compile_prefill(model, fuse_layers: bool = True, dynamic: bool | str = "tokens"):
    """Run the non-attention work through torch.compile; returns model.

    The weights are passed as arguments, so one compiled graph serves all layers (no per-layer
    recompiles). dynamic="tokens" (default): only the token count T is symbolic, so one graph serves
    every T >= 2 and T == 1 gets its own; dynamic=True: every size symbolic (slower kernels, see
    bench/results/kernels-h100.md). Attention stays eager between the compiled pieces. With
    fuse_layers, one compiled region spans layer i's o_proj/MLP and layer i+1's norm/qkv/rope.
    The compiled functions belong to this model (compiling another model compiles afresh).
    Undo with uncompile(model).
    """
    pieces = CompiledPieces.build(dynamic)
    pre, post, norm = pieces.pre, pieces.post, pieces.norm
    for layer in model.layers:
        layer.forward = functools.partial(_layer_forward, layer, pre, post)
    model.norm.forward = lambda x, _n=model.norm: norm(x, _n.weight, _n.eps)
    if fuse_layers and len(model.layers):
        model.forward = functools.partial(_model_forward, model, pre, post, pieces.post_pre, norm)
    else:
        model.__dict__.pop("forward", None)
    model._rapid_pieces = pieces  # the piecewise graph runner captures these same functions
    return model


def uncompile(model):
    """Restore the eager forwards that compile_prefill replaced."""
    for layer in model.layers:
        layer.__dict__.pop("forward", None)
    model.norm.__dict__.pop("forward", None)
    model.__dict__.pop("forward", None)
    model._rapid_pieces = None
    return model

"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) on a paged KV cache.

One forward call takes the flattened tokens of many sequences (decode steps and prefill chunks
together) and an AttentionMetadata that says where each token's keys and values live in the pool.
Shapes: T = tokens in the batch, H = query heads, KVH = key/value heads, D = head_dim.

A layer's work is split where attention runs: `pre_attention` (norm, qkv) and `post_attention`
(o_proj, MLP) are plain tensor code; attention (rope, paged KV writes, varlen kernels) runs between them: the
backend rotates queries and keys in place as it stores the keys (one kernel in the Triton backend).
The forward walks three pieces, the functions between two attention calls: layer 0's pre-attention;
for each next layer, the previous layer's post-attention and this layer's pre-attention together
(`post_then_pre`, so the residual add fuses with the next norm); the last layer's post-attention and
the final norm (`post_then_norm`). `compile_pieces` swaps in torch.compile'd copies of those methods
(attention stays eager between them); the CUDA-graph runners in rapid/compile capture the same pieces.
"""

from __future__ import annotations

import math
import types
from typing import Callable, NamedTuple

import torch
from torch import nn

from rapid.attention.metadata import AttentionMetadata
from rapid.attention.rope import Rope
from rapid.model.config import ModelConfig, RopeConfig
from rapid.model.linear import GemvConfig, Linear, config_for, linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2], with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotate-half rope's cos/sin table (the Hugging Face layout) up to max_positions; the attention backends apply
    it (rapid/attention/rope.py)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def at(self, positions: torch.Tensor) -> Rope:
        """What the attention backend needs to rope rows at positions [T]."""
        return Rope(self.cos_sin, positions)


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, rounded once to x's dtype as a bf16 add is. Written in float32 so that torch.compile fuses the add
    into the next norm's kernel instead of into the matmul before it (cuBLAS addmm: a copy of x, then a GEMM that
    adds it); compiled, that norm then reads the float32 sum before its rounding (tests/test_gpu_attention.py)."""
    return (x.float() + y.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.q_size, self.kv_size = cfg.head_dim, cfg.q_size, cfg.kv_size
        # q, k and v projections fused into one matmul; the loader stacks the checkpoint's three.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend

    def qkv(self, x: torch.Tensor):
        """x [T, hidden] (normed) -> q [T, H, D], k [T, KVH, D] (q/k-normed for Qwen3; not yet roped), v [T, KVH, D]."""
        heads = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))  # [T, H + 2 KVH, D]
        n_q, n_kv = self.q_size // self.head_dim, self.kv_size // self.head_dim
        q, k, v = heads.split([n_q, n_kv, n_kv], dim=1)  # views of one buffer
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attend(self, q, k, v, kv_pool: torch.Tensor, meta: AttentionMetadata, rope: Rope) -> torch.Tensor:
        """Ropes q and k in place, writes k, v into this layer's slots of the pool; returns [T, H, D]. Runs eagerly,
        never compiled."""
        return self.backend.forward(q, k, v, kv_pool[self.layer_idx], meta, rope=rope)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate and up fused
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)), as the methods around the attention call.

    The methods read no per-layer Python values (layer_idx stays in `attend`), so one compiled graph of
    each serves every layer: the layer is an argument, its weights graph inputs.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def pre_attention(self, x: torch.Tensor):
        """x [T, hidden] -> q [T, H, D], k, v [T, KVH, D]: input norm, fused qkv (+ q/k norm)."""
        return self.self_attn.qkv(self.input_layernorm(x))

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], attn [T, H, D] -> x [T, hidden]: o_proj + residual, norm, SwiGLU MLP + residual."""
        x = residual_add(x, self.self_attn.o_proj(attn.flatten(1)))
        return residual_add(x, self.mlp(self.post_attention_layernorm(x)))

    def post_then_pre(self, x, attn, nxt: DecoderLayer):
        """This layer's post-attention work and the next layer's pre-attention work -> x, q, k, v."""
        x = self.post_attention(x, attn)
        return (x, *nxt.pre_attention(x))

    def post_then_norm(self, x, attn, norm: RMSNorm) -> torch.Tensor:
        """The last layer's post-attention work and the model's final norm -> hidden [T, hidden]."""
        return norm(self.post_attention(x, attn))


class Pieces(NamedTuple):
    """The work between attention calls, each taking its layer first: the methods, or compiled copies."""

    pre: Callable  # (layer, x) -> q, k, v
    post_pre: Callable  # (layer, x, attn, next layer) -> x, q, k, v
    post_norm: Callable  # (layer, x, attn, norm) -> hidden


EAGER = Pieces(DecoderLayer.pre_attention, DecoderLayer.post_then_pre, DecoderLayer.post_then_norm)


class LlamaModel(nn.Module):
    """Decoder stack + LM head. Parameter names follow Hugging Face, except the fused projections."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.pieces = EAGER  # compile_pieces replaces them with this model's compiled copies
        self.logits_gemv: GemvConfig | None = None  # use_gemv sets it

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_pool: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]. Writes this step's KV into kv_pool."""
        fn, layers, rope = self.pieces, self.layers, self.rotary.at(positions)
        meta = layers[0].self_attn.backend.plan(meta)  # what every layer's attention call shares, built once
        x = self.embed_tokens(input_ids)  # [T, hidden]
        q, k, v = fn.pre(layers[0], x)  # [T, H, D], [T, KVH, D], [T, KVH, D]
        for i in range(len(layers) - 1):
            attn = layers[i].self_attn.attend(q, k, v, kv_pool, meta, rope)  # [T, H, D]
            x, q, k, v = fn.post_pre(layers[i], x, attn, layers[i + 1])
        attn = layers[-1].self_attn.attend(q, k, v, kv_pool, meta, rope)
        return fn.post_norm(layers[-1], x, attn, self.norm)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] (the rows that sample) -> float32 logits [S, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, None, self.logits_gemv).float()

    def use_gemv(self, on: bool) -> LlamaModel:
        """One token's products (a batch-1 decode step, one row's logits) through the Triton GEMV (CUDA only)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.use_gemv(on)
        self.logits_gemv = config_for(self.config.hidden_size) if on else None
        return self

    def compile_pieces(self, dynamic: bool | str = "tokens") -> LlamaModel:
        """Run the pieces through torch.compile (fullgraph); attention stays eager between them. Returns self.

        dynamic="tokens" (the default, fastest on the H100): only the token count T is symbolic, so the
        other sizes are constants in the fused kernels; one graph serves T >= 2, T == 1 gets its own.
        dynamic=True: every size symbolic; False: a graph per T. The compiled functions belong to this
        model: compiling another model compiles afresh, with its own Dynamo caches and recompile budget.
        """
        if dynamic not in (True, False, "tokens"):
            raise ValueError(f"dynamic must be True, False or 'tokens', got {dynamic!r}")
        self.pieces = Pieces(*(_compile(fn, dynamic) for fn in EAGER))
        return self

    def uncompile_pieces(self) -> LlamaModel:
        """Back to the eager methods."""
        self.pieces = EAGER
        return self


def _compile(fn, dynamic: bool | str):
    """torch.compile of a fresh copy of fn: Dynamo keeps compiled entries (and counts its recompile limit)
    per code object, so the copy gives this model caches of its own instead of process-wide ones."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    if dynamic != "tokens":
        return torch.compile(own, dynamic=dynamic, fullgraph=True)
    compiled = torch.compile(own, dynamic=None, fullgraph=True)

    def call(*args):
        for a in args:  # every tensor argument of a piece has T as dim 0 (the weights come with the modules)
            if isinstance(a, torch.Tensor) and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)

    return call

"""Paged attention backends. All take q [T, H, D], k/v [T, KVH, D], one layer of the pool, metadata."""

from __future__ import annotations

import logging

import torch

from rapid.attention.reference import ReferenceAttention

logger = logging.getLogger(__name__)


def select_backend(name: str, model_cfg, device: torch.device, prefill_attention: str = "flash"):
    """'auto' picks the Triton backend on CUDA and the reference backend on the CPU.

    prefill_attention (Triton backend): "paged" (the Triton paged prefill kernel, graph-safe: the engine's
    default, EngineConfig.prefill_attention), or an SDPA kernel: "flash", "cudnn" or "auto" (torch's choice);
    the reference backend ignores it."""
    args = (model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim, model_cfg.head_dim**-0.5)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "reference"
    if name == "reference":
        return ReferenceAttention(*args)
    if device.type != "cuda":
        raise ValueError(f"attention_backend {name!r} needs a CUDA device; on {device} use 'reference'")
    if name == "triton":
        from rapid.attention.triton_backend import TritonAttention

        return TritonAttention(*args, prefill_attention=prefill_attention)
    if name == "flashinfer":
        raise ValueError("attention_backend 'flashinfer' is not implemented: it could not be installed and tested on "
                         "the GPUs this engine is validated on; use 'triton' (the default on CUDA)")
    raise ValueError(f"unknown attention_backend {name!r}; supported: auto, reference, triton, flashinfer")

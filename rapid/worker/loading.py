"""Start-up pieces shared by every mode: device, model, KV pool sizing, tokenizer, attention backend."""

from __future__ import annotations

import logging

import torch

from rapid.attention.kv_dtype import float8_unsupported, resolve_kv_dtype
from rapid.config import EngineConfig
from rapid.model.config import ModelConfig
from rapid.model.loader import build_model, resolve_dtype
from rapid.worker.memory import ProcessMemory, describe, kv_budget_bytes

logger = logging.getLogger(__name__)


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__})")
    return torch.device(config.device)


def make_attention_backend(config: EngineConfig, model_cfg: ModelConfig, device: torch.device):
    from rapid.attention import select_backend

    backend = select_backend(config.attention_backend, model_cfg, device, prefill_attention=prefill_attention(config))
    if device.type == "cuda":
        why = float8_unsupported(config.cache.kv_cache_dtype, backend.name, torch.cuda.get_device_capability(device))
        if why:
            raise ValueError(why)
    return backend


def prefill_attention(config: EngineConfig) -> str:
    """The prefill attention a process runs: 'paged' pays inside whole CUDA graphs only (run eagerly, a mixed step
    took 161 ms on the H200 against 48 with flash SDPA), so with enforce_eager it becomes flash."""
    if config.prefill_attention == "paged" and config.enforce_eager:
        logger.info("enforce_eager: prefill attention 'flash' (SDPA) instead of 'paged', which pays only inside "
                    "whole CUDA graphs")
        return "flash"
    return config.prefill_attention


def kv_block_bytes(model_cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    return model_cfg.kv_block_bytes(block_size, dtype.itemsize)


def num_kv_blocks(config: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  weight_bytes: int = 0, processes: list[ProcessMemory] | None = None) -> int:
    """Blocks in the pool (of config.cache.kv_cache_dtype; `dtype` is the model's): from kv_cache_memory_bytes,
    else from the GPU share, else the CPU default.

    On the GPU the budget is gpu_memory_utilization * total memory minus the weights and what each of
    the engine's processes measured it needs (`processes`, see rapid.worker.memory), never a device-wide
    free-memory difference, since two workers share the GPU.
    """
    cache = config.cache
    per_block = kv_block_bytes(model_cfg, cache.block_size, resolve_kv_dtype(cache.kv_cache_dtype, dtype))
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = kv_budget_bytes(total, cache.gpu_memory_utilization, weight_bytes, processes or [], per_block)
        logger.info("KV sizing on %s: %.2f GiB x %g - weights %.2f GiB - (%s) = %.2f GiB for the KV cache", device,
                    total / 2**30, cache.gpu_memory_utilization, weight_bytes / 2**30, describe(processes or []),
                    budget / 2**30)
    else:
        budget = cache.cpu_kv_cache_bytes
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"KV budget {budget} bytes is smaller than one block ({per_block} bytes)")
    return blocks


def load_model(config: EngineConfig, device: torch.device):
    model_cfg = ModelConfig.from_folder(config.model)
    dtype = resolve_dtype(config.dtype, device)
    backend = make_attention_backend(config, model_cfg, device)
    max_positions = max(config.scheduler.max_model_len, 1)
    model = build_model(config.model, backend, dtype, device, max_positions=max_positions,
                        load_format=config.load_format)
    return model, dtype

"""Engine configuration: frozen dataclasses, validated once at the edge (ValueError quoting the numbers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("hybrid", "rapid", "disagg")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # explicit pool size; else measured (see runtime.memory)
    gpu_memory_utilization: float = 0.9  # the engine's share of the whole GPU
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = 256 * 2**20  # the CPU default pool when nothing is given

    def __post_init__(self):
        _check(isinstance(self.block_size, int) and self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a positive power of two, got {self.block_size!r}")
        _check(self.kv_cache_memory_bytes is None or (isinstance(self.kv_cache_memory_bytes, int)
                                                        and self.kv_cache_memory_bytes > 0),
               f"kv_cache_memory_bytes must be a positive integer, got {self.kv_cache_memory_bytes!r}")
        u = self.gpu_memory_utilization
        _check(isinstance(u, (int, float)) and math.isfinite(u) and 0 < u <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {u!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # token budget of one hybrid step / one prefill launch
    max_model_len: int = 4096

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class RapidConfig:
    """Settings of mode 'rapid': two workers sharing the GPU through MPS."""

    prefill_sm_percentage: int = 70  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the prefill worker
    decode_sm_percentage: int = 30
    use_mps: bool = True  # False: time-sliced (no real concurrency), with a warning
    worker_start_timeout_s: float = 300.0
    decode_lookahead_blocks: int = 2  # blocks granted ahead of a decoding sequence
    tpot_target_ms: float | None = None  # set: the core adapts the prefill tokens per launch to keep TPOT under it

    def __post_init__(self):
        for name in ("prefill_sm_percentage", "decode_sm_percentage"):
            v = getattr(self, name)
            _check(isinstance(v, int) and 1 <= v <= 100, f"{name} must be an integer in [1, 100], got {v!r}")
        _check(self.worker_start_timeout_s > 0, f"worker_start_timeout_s must be > 0, got {self.worker_start_timeout_s}")
        _check(self.tpot_target_ms is None or (isinstance(self.tpot_target_ms, (int, float))
                                                 and math.isfinite(self.tpot_target_ms) and self.tpot_target_ms > 0),
               f"tpot_target_ms must be a positive number or None, got {self.tpot_target_ms!r}")
        _check(isinstance(self.decode_lookahead_blocks, int) and self.decode_lookahead_blocks >= 1,
               f"decode_lookahead_blocks must be >= 1, got {self.decode_lookahead_blocks!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a Hugging Face model folder
    tokenizer: str | None  # None: token ids in and out, no detokenisation
    mode: str = "hybrid"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto | reference | triton | flashinfer
    prefill_attention: str = "flash"  # CUDA prefill SDPA: flash | cudnn | auto (torch's choice)
    load_format: str = "safetensors"  # or "dummy": random weights at the config's shapes (benchmarks)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rapid: RapidConfig = field(default_factory=RapidConfig)

    def __post_init__(self):
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(self.attention_backend in ("auto", "reference", "triton", "flashinfer"),
               f"attention_backend must be auto|reference|triton|flashinfer, got {self.attention_backend!r}")
        _check(self.prefill_attention in ("flash", "cudnn", "auto"),
               f"prefill_attention must be flash|cudnn|auto, got {self.prefill_attention!r}")
        _check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(self.load_format in ("safetensors", "dummy"),
               f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")

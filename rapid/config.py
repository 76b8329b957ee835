"""Engine configuration, written once.

EngineArgs is every option a user sets (LLM's keyword arguments, the CLI's engine flags), each with its
default and help text; EngineArgs.create_engine_config() turns it into the frozen, validated EngineConfig
(CacheConfig, SchedulerConfig, RapidConfig) that the engine reads. Defaults live in those sub-configs and
EngineArgs reads them from there. Errors in user values are ValueErrors quoting the numbers.
No torch and no transformers here: the client, the protocol and the CLI import this module.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from rapid.config_cli import add_engine_flags
from rapid.generation_defaults import GENERATION_CONFIG_HELP, OVERRIDE, OVERRIDE_HELP, check_override
from rapid.model.config import ModelConfig
from rapid.model.default_name import DEFAULT_MODEL_NAME
from rapid.model.folder import resolve_model_path

MODES = ("hybrid", "rapid", "disagg")
DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")
ATTENTION_BACKENDS = ("auto", "reference", "triton", "flashinfer")
PREFILL_ATTENTIONS = ("flash", "cudnn", "auto", "paged")
LOAD_FORMATS = ("safetensors", "dummy")
PLACEMENTS = ("adaptive", "static", "atom", "mixed")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's names; fp8 is fp8_e4m3


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_bool(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    _check(isinstance(v, bool), f"{name} must be True or False, got {v!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # explicit pool size; else measured (see worker.memory)
    gpu_memory_utilization: float = 0.9  # the engine's share of the whole GPU
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = 256 * 2**20  # the CPU default pool when nothing is given
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8*: one byte an element, stored saturated, scale 1

    def __post_init__(self):
        _check(_is_int(self.block_size) and self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a positive power of two, got {self.block_size!r}")
        _check(self.kv_cache_memory_bytes is None or (_is_int(self.kv_cache_memory_bytes)
                                                        and self.kv_cache_memory_bytes > 0),
               f"kv_cache_memory_bytes must be a positive integer, got {self.kv_cache_memory_bytes!r}")
        u = self.gpu_memory_utilization
        _check(_is_number(u) and math.isfinite(u) and 0 < u <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        _check_bool(self, "enable_prefix_caching")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")


# max_num_seqs=None: fitted to the KV pool once it is sized (fit_to_pool): as many sequences as the pool holds at
# max_model_len tokens each (above the floor, that many full-length sequences fit without preempting one another),
# within AUTO_MAX_NUM_SEQS. Measured on the H200 (8B, 1,024 requests of 1000 in and 1000 out): 256 sequences with
# 8192 tokens a step gave 8,872 output tok/s; pool / 1,024 tokens with 16384 tokens 7,137; 512 sequences with no
# preemption (admission_reserve 1) 8,683 (bench/results/offline-h200.md).
AUTO_MAX_NUM_SEQS = (256, 1024)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = None  # None: fitted to the KV pool (fit_to_pool)
    max_num_batched_tokens: int = 8192  # token budget of one hybrid step / one prefill launch
    max_model_len: int = 4096
    # Admission keeps room in the KV pool for every admitted request to reach its prompt plus this share of its
    # max_tokens (outputs beyond that share are not reserved): 1.0 admits only what can run to its max_tokens
    # without preempting anyone; 0.0 admits while the prompt fits (vLLM's rule, which preempts and recomputes once
    # the pool runs out).
    admission_reserve: float = 0.0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if name == "max_num_seqs" and v is None:
                continue
            _check(_is_int(v) and v > 0, f"{name} must be a positive integer, got {v!r}")
        r = self.admission_reserve
        _check(_is_number(r) and 0 <= r <= 1, f"admission_reserve must be in [0, 1], got {r!r}")

    @property
    def max_num_seqs_bound(self) -> int:
        """The most sequences a step can hold before the pool is known (what memory profiling plans for)."""
        return AUTO_MAX_NUM_SEQS[1] if self.max_num_seqs is None else self.max_num_seqs


@dataclass(frozen=True)
class RapidConfig:
    """Settings of mode 'rapid': prefill and decode workers sharing the GPU through MPS."""

    # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of each worker. 100/100: the best static split measured on the H200 (offline
    # 1.00x hybrid at 256 and 1,024 requests; lower TTFT and TPOT tails in serving: bench/results/REPORT.md)
    prefill_sm_percentage: int = 100
    decode_sm_percentage: int = 100
    # a second prefill worker at this MPS share, mapping the same arena (None: none). A process's share is fixed at
    # its start, so this is the run-time spatial lever: the placement policy routes each prefill batch to one of them
    second_prefill_sm_percentage: int | None = None
    use_mps: bool = True  # False: time-sliced (no real concurrency), with a warning
    worker_start_timeout_s: float = 300.0
    decode_lookahead_blocks: int = 2  # blocks granted ahead of a decoding sequence
    placement: str = "adaptive"  # one of PLACEMENTS; EngineArgs.placement's help says what each does
    slo_ttft_ms: float | None = None  # the SLOs the adaptive placement plans for; None: maximise throughput
    slo_tpot_ms: float | None = None

    def __post_init__(self):
        for name in ("prefill_sm_percentage", "decode_sm_percentage"):
            v = getattr(self, name)
            _check(_is_int(v) and 1 <= v <= 100, f"{name} must be an integer in [1, 100], got {v!r}")
        v = self.second_prefill_sm_percentage
        _check(v is None or (_is_int(v) and 1 <= v <= 100),
               f"second_prefill_sm_percentage must be an integer in [1, 100] or None, got {v!r}")
        _check(self.placement != "atom" or v is not None, "placement 'atom' routes prefill batches between two prefill "
               "workers: give second_prefill_sm_percentage too (ATOM restricts prefill to half the GPU: 50)")
        _check(v is None or self.placement in ("adaptive", "atom"), f"second_prefill_sm_percentage ({v}) starts a "
               f"prefill worker that placement {self.placement!r} never uses; use 'adaptive' or 'atom', or omit it")
        _check(_is_number(self.worker_start_timeout_s) and self.worker_start_timeout_s > 0,
               f"worker_start_timeout_s must be > 0, got {self.worker_start_timeout_s!r}")
        _check_bool(self, "use_mps")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            v = getattr(self, name)
            _check(v is None or (_is_number(v) and math.isfinite(v) and v > 0),
                   f"{name} must be a positive number of milliseconds or None, got {v!r}")
        _check(self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        _check(_is_int(self.decode_lookahead_blocks) and self.decode_lookahead_blocks >= 1,
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
    async_scheduling: bool = True  # the decode executor launches step N+1 before it reads step N back
    # mode hybrid: the engine core and the model in a child process (modes rapid and disagg always have one), so
    # the frontend's threads (HTTP, streaming) never take the interpreter from the step loop
    engine_process: bool = False
    attention_backend: str = "auto"  # auto | reference | triton | flashinfer
    prefill_attention: str = "paged"  # triton backend: paged (whole-graph mixed steps) | flash | cudnn | auto (SDPA)
    load_format: str = "safetensors"  # or "dummy": random weights at the config's shapes (benchmarks)
    generation_config: str = "auto"  # sampling defaults: rapid.generation_defaults reads them
    override_generation_config: tuple[tuple[str, Any], ...] | None = None  # a dict, stored as pairs: check_override
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rapid: RapidConfig = field(default_factory=RapidConfig)

    def __post_init__(self):
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        p2, placement = self.rapid.second_prefill_sm_percentage, self.rapid.placement
        _check(self.mode == "rapid" or (p2 is None and placement == "adaptive"), f"second_prefill_sm_percentage "
               f"({p2}) and placement ({placement!r}) need mode 'rapid' (its prompts' lanes), not {self.mode!r}")
        _check(not isinstance(self.dtype, str) or self.dtype in DTYPES,
               f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or
                                                 self.device.startswith("cuda:") and self.device[5:].isdigit()),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(self.attention_backend in ATTENTION_BACKENDS,
               f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _check(self.prefill_attention in PREFILL_ATTENTIONS,
               f"prefill_attention must be one of {PREFILL_ATTENTIONS}, got {self.prefill_attention!r}")
        _check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _check(self.load_format in LOAD_FORMATS,
               f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        _check(isinstance(self.generation_config, str) and self.generation_config.strip() != "", "generation_config "
               f"must be 'auto', 'vllm' or a folder holding generation_config.json, got {self.generation_config!r}")
        object.__setattr__(self, "override_generation_config", check_override(self.override_generation_config))
        _check_bool(self, "enforce_eager")
        _check_bool(self, "async_scheduling")
        _check_bool(self, "engine_process")

    @property
    def decode_runs_prompts(self) -> bool:
        """Mode rapid whose placement may put prompts in the decode worker's steps (adaptive, mixed)."""
        return self.mode == "rapid" and self.rapid.placement in ("adaptive", "mixed")


def _shared(owner: type, name: str, help: str, **meta: Any) -> Any:
    """An EngineArgs field whose default is `owner`'s field `name`: defaults are written once, in the sub-configs.
    Metadata: help; optionally choices, gpu_only, metavar, and none (what a default of None means)."""
    default = owner.__dataclass_fields__[name].default
    if default is MISSING:
        raise TypeError(f"{owner.__name__}.{name} has no default to share")
    return field(default=default, metadata={"help": help, **meta})


def _own(default: Any, help: str, **meta: Any) -> Any:
    """An EngineArgs field that no sub-config holds (it is resolved by create_engine_config)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EngineArgs:
    """Every user-settable engine option, once: LLM's keyword arguments and the CLI's engine flags."""

    model: str | None = _own(
        None, "Hugging Face model folder (config.json + *.safetensors + tokenizer files)",
        none=f"the bundled {DEFAULT_MODEL_NAME}, converted once, then cached", metavar="FOLDER")
    tokenizer: str | None = _own(None, "tokenizer folder", none="the model folder", metavar="FOLDER")
    skip_tokenizer_init: bool = _own(
        False, "load no tokenizer: token ids in and out (text prompts and chat are refused)")
    mode: str = _shared(
        EngineConfig, "mode", "hybrid: one worker, decode steps with prefill chunks; rapid: prefill and decode "
        "workers at once on one device; disagg: prefill and decode workers on two GPUs", choices=MODES)
    dtype: str = _shared(
        EngineConfig, "dtype", "weight and activation dtype; auto: float32 on the CPU, bfloat16 on the GPU",
        choices=DTYPES)
    device: str = _shared(EngineConfig, "device", "auto (CUDA when available), cpu, cuda or cuda:N")
    load_format: str = _shared(
        EngineConfig, "load_format", "safetensors: the folder's weights; dummy: random weights at the config's "
        "shapes (benchmarks without a checkpoint)", choices=LOAD_FORMATS)
    generation_config: str = _shared(EngineConfig, "generation_config", GENERATION_CONFIG_HELP,
                                     metavar="auto|vllm|FOLDER")
    override_generation_config: dict[str, Any] | None = _shared(EngineConfig, OVERRIDE, OVERRIDE_HELP, none="none")
    seed: int = _shared(EngineConfig, "seed", "seed of the engine's sampler for requests without their own seed; "
                        "their draws also depend on which requests share a batch, which timing decides in rapid and "
                        "disagg: a request's own seed repeats its output in every mode and run")
    max_model_len: int | None = _own(
        None, "most tokens of one sequence (prompt + output), at most the model's max_position_embeddings",
        none="max_position_embeddings", human=True)
    max_num_seqs: int | None = _shared(
        SchedulerConfig, "max_num_seqs", "most sequences running at once (the decode batch)",
        none=f"fitted to the KV pool: the sequences it holds at max_model_len tokens each, "
             f"between {AUTO_MAX_NUM_SEQS[0]} and {AUTO_MAX_NUM_SEQS[1]}")
    max_num_batched_tokens: int = _shared(
        SchedulerConfig, "max_num_batched_tokens", "token budget of one hybrid step or one prefill launch", human=True)
    admission_reserve: float = _shared(
        SchedulerConfig, "admission_reserve", "admission keeps KV room for each running request's prompt plus this "
        "share of its max_tokens; 1.0: never preempt, 0.0: admit while the prompt fits (vLLM)")
    block_size: int = _shared(CacheConfig, "block_size", "tokens per KV-cache block (a power of two)")
    kv_cache_memory_bytes: int | None = _shared(
        CacheConfig, "kv_cache_memory_bytes", "KV-cache pool size in bytes", metavar="BYTES",
        none=f"measured on the GPU (see gpu_memory_utilization), {CacheConfig.cpu_kv_cache_bytes >> 20} MiB on the CPU")
    gpu_memory_utilization: float = _shared(
        CacheConfig, "gpu_memory_utilization", "the engine's share of the whole GPU memory, in (0, 1]; the KV cache "
        "gets what weights and activations leave of it", gpu_only=True)
    enable_prefix_caching: bool = _shared(
        CacheConfig, "enable_prefix_caching", "reuse the KV blocks of prompt prefixes already computed")
    kv_cache_dtype: str = _shared(
        CacheConfig, "kv_cache_dtype", "KV-cache element type; auto: the model's dtype; bfloat16; fp8 (= fp8_e4m3) or "
        "fp8_e5m2: one byte an element, so twice the blocks of bf16 and half the bytes each decode step reads (values "
        "saturate at the format's largest; no scales)", choices=KV_CACHE_DTYPES)
    async_scheduling: bool = _shared(
        EngineConfig, "async_scheduling", "the decode executor enqueues step N+1 before it reads step N's tokens "
        "back, so host work overlaps the device (steps whose rows need the previous token on the host, such as "
        "penalties, bad words or structured outputs, still run one at a time)")
    engine_process: bool = _shared(
        EngineConfig, "engine_process", "mode hybrid: run the engine core and the model in a child process (modes "
        "rapid and disagg always do), so HTTP and streaming in the frontend never hold up a step; rapid serve turns "
        "it on")
    enforce_eager: bool = _shared(
        EngineConfig, "enforce_eager", "run eagerly: no compilation and no CUDA graphs (quicker start, slower steps)",
        gpu_only=True)
    attention_backend: str = _shared(
        EngineConfig, "attention_backend", "auto: triton on CUDA, reference on the CPU", choices=ATTENTION_BACKENDS)
    prefill_attention: str = _shared(
        EngineConfig, "prefill_attention", "prefill attention of the triton backend: paged (the default: a Triton "
        "kernel reading the paged pool with no host sync, so prefill and mixed batches run as whole CUDA graphs), "
        "or SDPA run eagerly between piecewise graphs: flash (no per-shape set-up), cudnn (faster on repeated "
        "shapes, but plans every new length pair), auto (torch's choice)",
        choices=PREFILL_ATTENTIONS, gpu_only=True)
    prefill_sm_percentage: int = _shared(
        RapidConfig, "prefill_sm_percentage", "mode rapid: percentage of the SMs the prefill worker may use "
        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE)", gpu_only=True)
    decode_sm_percentage: int = _shared(
        RapidConfig, "decode_sm_percentage", "mode rapid: percentage of the SMs the decode worker may use",
        gpu_only=True)
    second_prefill_sm_percentage: int | None = _shared(
        RapidConfig, "second_prefill_sm_percentage", "mode rapid: start a second prefill worker at this percentage "
        "of the SMs, mapping the same weights and KV; the placement policy picks a prefill worker per batch (the "
        "run-time spatial lever)", none="one prefill worker")
    use_mps: bool = _shared(
        RapidConfig, "use_mps", "mode rapid: run the two workers under CUDA MPS; without it they are time-sliced "
        "(no real concurrency, with a warning)", gpu_only=True)
    worker_start_timeout_s: float = _shared(
        RapidConfig, "worker_start_timeout_s", "modes rapid and disagg, and hybrid with engine_process: seconds to "
        "wait for each engine process to load its model and capture its graphs")
    decode_lookahead_blocks: int = _shared(
        RapidConfig, "decode_lookahead_blocks", "every mode: KV blocks granted ahead of a decoding sequence")
    placement: str = _shared(
        RapidConfig, "placement", "mode rapid: where each prefill batch runs; adaptive: inside the decode step "
        "(hybrid batching) or on a prefill worker, chosen per batch from the load and the SLOs; static: always the "
        "prefill worker; atom: the ROCm ATOM rule (the second prefill worker while 64 or more requests decode, "
        "else the first); mixed: always inside the decode step (hybrid batching across rapid's processes, a baseline)",
        choices=PLACEMENTS)
    slo_ttft_ms: float | None = _shared(
        RapidConfig, "slo_ttft_ms", "time-to-first-token SLO in ms that mode rapid's adaptive placement plans for",
        none="none: maximise throughput")
    slo_tpot_ms: float | None = _shared(
        RapidConfig, "slo_tpot_ms", "time-per-output-token SLO in ms that mode rapid's adaptive placement plans for "
        "(it also bounds the prefill tokens per launch)", none="none: maximise throughput")
    # vLLM's, accepted so that scripts written for vLLM run; nothing past create_engine_config reads them
    trust_remote_code: bool = _own(False, "accepted for vLLM scripts; changes nothing: RAPID runs no code from a "
                                          "checkpoint (its own Llama-family models; tokenizers without remote code)")
    tensor_parallel_size: int = _own(1, "accepted for vLLM scripts: only 1 (RAPID runs a model on one GPU)",
                                     alias="-tp")
    pipeline_parallel_size: int = _own(1, "accepted for vLLM scripts: only 1 (RAPID runs a model on one GPU)",
                                       alias="-pp")
    disable_log_stats: bool = _own(False, "accepted for vLLM scripts; changes nothing: RAPID logs no periodic "
                                          "stats (/metrics is served either way)")
    enable_chunked_prefill: bool | None = _own(None, "accepted for vLLM scripts: prefill is always chunked "
                                                     "(max_num_batched_tokens a step); False is refused")

    # ------------------------------------------------------------------ to the engine
    def create_engine_config(self) -> EngineConfig:
        """The validated EngineConfig: ValueError quoting the value, FileNotFoundError for a missing folder."""
        for name in ("skip_tokenizer_init", "trust_remote_code", "disable_log_stats"):
            _check_bool(self, name)
        _check(self.enable_chunked_prefill in (None, True), f"enable_chunked_prefill={self.enable_chunked_prefill!r}: "
               "RAPID always chunks prefill (max_num_batched_tokens tokens a step); leave it out or True")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            v = getattr(self, name)
            _check(_is_int(v) and v == 1, f"{name} must be 1, got {v!r}: RAPID runs a model on one GPU, with no "
                   "tensor or pipeline parallelism")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.max_model_len is None:  # a stand-in until the model's config is read
            values["max_model_len"] = SchedulerConfig.max_model_len

        def sub(cls):
            return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

        top = {f.name: values[f.name] for f in fields(EngineConfig) if f.name in values and f.name != "model"}
        # Every value is checked before the model folder is read (model=None converts the default model).
        draft = EngineConfig(model="", **top | {"tokenizer": None}, cache=sub(CacheConfig),
                             scheduler=sub(SchedulerConfig), rapid=sub(RapidConfig))
        folder = resolve_model_path(self.model)
        model_cfg = ModelConfig.from_folder(folder)
        longest = model_cfg.max_position_embeddings
        limit = longest if self.max_model_len is None else self.max_model_len
        if limit > longest:
            raise ValueError(f"max_model_len ({limit}) exceeds the model's max_position_embeddings ({longest})")
        # fp8 is one byte; float32 where it is sure to be (asked for, or dtype auto on the CPU); else 16-bit: a bound
        wide = self.dtype in ("float32", "float") or (self.dtype == "auto" and self.device == "cpu")
        kind, itemsize = {"auto": ("float32", 4) if wide else ("16-bit (twice in float32)", 2),
                          "bfloat16": ("bfloat16", 2)}.get(self.kv_cache_dtype, ("fp8", 1))
        block = model_cfg.kv_block_bytes(draft.cache.block_size, itemsize)
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= block,
               f"kv_cache_memory_bytes ({self.kv_cache_memory_bytes}) holds no KV block: one block of "
               f"{draft.cache.block_size} tokens takes {block} bytes of this model's cache in {kind}")
        tokenizer = None if self.skip_tokenizer_init else str(self.tokenizer or folder)
        scheduler = replace(draft.scheduler, max_model_len=limit)
        return replace(draft, model=folder, tokenizer=tokenizer, scheduler=scheduler)

    # ------------------------------------------------------------------ from Python keywords
    @classmethod
    def from_kwargs(cls, caller: str = "EngineArgs", /, **kwargs: Any) -> "EngineArgs":
        """EngineArgs(**kwargs), but an unknown keyword is a TypeError that names it and its close matches."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=3, cutoff=0.6)
                hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            known = "" if all("did you mean" in h for h in hints) else f"; the engine arguments are {', '.join(names)}"
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(hints)}{known}")
        return cls(**kwargs)

    @classmethod
    def signature(cls) -> inspect.Signature:
        """(model=None, *, <every other field>=<default>): the signature of LLM."""
        kinds = {"model": inspect.Parameter.POSITIONAL_OR_KEYWORD}
        return inspect.Signature([
            inspect.Parameter(f.name, kinds.get(f.name, inspect.Parameter.KEYWORD_ONLY), default=f.default,
                              annotation=f.type) for f in fields(cls)])

    # ------------------------------------------------------------------ the command line
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
        """One --kebab-case flag per field (bools as --flag/--no-flag), with its help and default."""
        return add_engine_flags(cls, parser, exclude, defaults)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """The EngineArgs of parsed flags (a field without a flag keeps its default)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def seqs_for_pool(pool_tokens: int, max_model_len: int) -> int:
    """max_num_seqs for a KV pool of `pool_tokens` tokens: the full-length sequences it holds, a multiple of 8,
    within AUTO_MAX_NUM_SEQS."""
    low, high = AUTO_MAX_NUM_SEQS
    return max(low, min(high, pool_tokens // max_model_len // 8 * 8))


def fit_to_pool(config: EngineConfig, num_blocks: int) -> EngineConfig:
    """The config with max_num_seqs fitted to a pool of `num_blocks` blocks (unchanged when the user set it).
    The decode executor and the engine core call it with the same pool, so both hold the same number."""
    if config.scheduler.max_num_seqs is not None:
        return config
    seqs = seqs_for_pool(num_blocks * config.cache.block_size, config.scheduler.max_model_len)
    return replace(config, scheduler=replace(config.scheduler, max_num_seqs=seqs))

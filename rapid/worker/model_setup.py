"""The model, the KV pool and their memory plan inside one arena: the same start-up for every role.

Roles: 'hybrid' (one process runs every step shape, its arena private), 'decode', 'prefill' and 'prefill2'. The
owner of an arena measures what each process of the engine needs, sizes the KV pool from that, then
creates the arena and loads the weights into it; an importer maps the owner's arena and computes the
same layout from the config, so only an ArenaHandle crosses the process boundary.
"""

from __future__ import annotations

import logging

import torch

from rapid.attention.kv_dtype import as_bytes, resolve_kv_dtype
from rapid.config import EngineConfig, fit_to_pool
from rapid.model.config import ModelConfig
from rapid.model.loader import build_model, parameter_specs, resolve_dtype
from rapid.protocol.worker import ArenaHandle
from rapid.worker.arena import SharedArena, plan_layout
from rapid.worker.loading import kv_block_bytes, make_attention_backend, num_kv_blocks, resolve_device
from rapid.worker.memory import (
    ProcessMemory, non_torch_bytes, process_memory, profile_forward_memory, rounded,
)
from rapid.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def arena_layout(config: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, num_blocks: int):
    """Where each weight and the KV pool live inside the arena (the same on every side)."""
    from rapid.attention.metadata import kv_pool_shape

    entries = parameter_specs(model_cfg, dtype)
    entries.append(("kv_pool", kv_pool_shape(model_cfg.num_layers, num_blocks, config.cache.block_size,
                                             model_cfg.num_kv_heads, model_cfg.head_dim),
                    resolve_kv_dtype(config.cache.kv_cache_dtype, dtype)))
    return plan_layout(entries)


def arena_roles(config: EngineConfig, role: str) -> tuple[str, ...]:
    """The processes whose memory an owner's arena must leave room for on its GPU."""
    if config.mode != "rapid":
        return (role,)
    return ("decode", "prefill") + (("prefill2",) if config.rapid.second_prefill_sm_percentage is not None else ())


def runs_prefill_graphs(role: str, config: EngineConfig) -> bool:
    """The roles that capture prefill CUDA graphs: hybrid runs every step shape, the prefill workers prefill, and
    rapid's decode worker runs mixed steps when its placement may put prompts there (without graphs a
    mixed step there ran its layers eagerly: 48 ms at 50 req/s on the H200, against 16.5 in hybrid's graphs)."""
    return role in ("prefill", "prefill2", "hybrid") or (role == "decode" and config.decode_runs_prompts)


def profile_processes(config: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      roles: tuple[str, ...]) -> tuple[int, list[ProcessMemory]]:
    """The owner, before the arena exists (its size depends on the KV budget): profile a throw-away model
    (empty weights in private memory) for each role, measure the memory outside torch (while this is the
    engine's only CUDA process), and free it all.

    Returns (bytes each process holds outside the arena: its rope table, the processes' figures);
    (0, []) on the CPU or when kv_cache_memory_bytes is given.
    """
    if device.type != "cuda" or config.cache.kv_cache_memory_bytes is not None:
        return 0, []
    sched = config.scheduler
    views = {name: torch.empty(shape, dtype=dt, device=device) for name, shape, dt in parameter_specs(model_cfg, dtype)}
    before = torch.cuda.memory_allocated(device)
    model = build_model(config.model, make_attention_backend(config, model_cfg, device), dtype, device,
                        max_positions=sched.max_model_len, param_views=views, load=False)
    private = torch.cuda.memory_allocated(device) - before
    peaks = profile_forward_memory(model, device, sched.max_num_batched_tokens, sched.max_num_seqs_bound,
                                   sched.max_model_len, config.cache.block_size,
                                   resolve_kv_dtype(config.cache.kv_cache_dtype, dtype))
    non_torch = non_torch_bytes(device)
    del model, views
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # the peak reported at start-up covers the arena onwards
    return private, [process_memory(role, peaks, non_torch, prefill=runs_prefill_graphs(role, config),
                                    decode=role in ("decode", "hybrid"), graphs=not config.enforce_eager)
                     for role in roles]


class ModelSetup:
    """One process's model and KV pool inside an arena it owns (created here) or maps (`arena` given)."""

    def __init__(self, config: EngineConfig, role: str, *, arena: ArenaHandle | None = None, num_blocks: int = 0,
                 device: str | None = None, shared: bool = True):
        self.role = role
        self.device = torch.device(device) if device else resolve_device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model_cfg = ModelConfig.from_folder(config.model)
        self.dtype = resolve_dtype(config.dtype, self.device)
        owner = arena is None
        if owner:
            private, processes = profile_processes(config, model_cfg, self.dtype, self.device,
                                                   arena_roles(config, role))
            _, weights = plan_layout(parameter_specs(model_cfg, self.dtype))
            self.num_blocks = num_kv_blocks(config, model_cfg, self.dtype, self.device,
                                            weights + private * len(processes), processes)
        else:
            private, processes, self.num_blocks = 0, [], num_blocks
        self.config = fit_to_pool(config, self.num_blocks)  # max_num_seqs fitted to the pool (when not given)
        self.memory_plans = processes  # owner on CUDA: what each process of the engine was measured to need
        slots, total = arena_layout(config, model_cfg, self.dtype, self.num_blocks)
        # owner on CUDA: the torch bytes the KV sizing allows each process; the owner's allocator holds the arena,
        # an importer's does not (a CUDA IPC mapping)
        self.allowed_bytes = {p.name: private + p.torch_bytes + (rounded(total) if p.name == role else 0)
                              for p in processes}
        self.arena = SharedArena.create(total, self.device, shared) if owner else SharedArena.open(arena, self.device)
        views = {name: self.arena.view(slot) for name, slot in slots.items()}
        self.kv_pool = views.pop("kv_pool")  # [L, 2, NB, BS, KVH, D]
        if owner:
            as_bytes(self.kv_pool).zero_()  # unwritten slots must hold finite values (masked, but multiplied by 0)
        backend = make_attention_backend(config, model_cfg, self.device)
        self.model = build_model(config.model, backend, self.dtype, self.device,
                                 max_positions=config.scheduler.max_model_len, param_views=views, load=owner,
                                 load_format=config.load_format)
        logger.info("%s the %s arena: %.1f MiB (%d KV blocks of %d bytes, %s) on %s", "created" if owner else "mapped",
                    "shared" if shared else "private", total / 2**20, self.num_blocks,
                    kv_block_bytes(model_cfg, config.cache.block_size, self.kv_pool.dtype), self.kv_pool.dtype,
                    self.device)

    def make_runner(self, eos_token_ids: tuple[int, ...]) -> ModelRunner:
        """Compile and capture this role's graphs (decode steps and/or prefill batches), then the runner."""
        from rapid.compile import prepare_model

        config = self.config
        graphs = prepare_model(self.model, self.kv_pool, config, decode_graphs=self.role in ("decode", "hybrid"),
                               prefill_graphs=runs_prefill_graphs(self.role, config))
        return ModelRunner(self.model, self.kv_pool, config.cache.block_size, config.seed, graph_runners=graphs,
                           eos_token_ids=eos_token_ids)

    def close(self) -> None:
        self.model = self.kv_pool = None
        self.arena.close()


def open_peer_pool(config: EngineConfig, handle: ArenaHandle, num_blocks: int,
                   device: torch.device) -> tuple[SharedArena, torch.Tensor]:
    """disagg: map the prefill worker's arena and return its KV pool (the source of hand-off copies)."""
    model_cfg = ModelConfig.from_folder(config.model)
    dtype = resolve_dtype(config.dtype, device)
    slots, _ = arena_layout(config, model_cfg, dtype, num_blocks)
    arena = SharedArena.open(handle, device)
    return arena, arena.view(slots["kv_pool"])

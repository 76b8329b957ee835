"""The two worker processes of mode 'rapid': a decode worker (owner of the shared weights and KV pool)
and a prefill worker (maps them). Each runs its own loop and keeps its device busy without waiting on
the engine core between steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import msgspec
import torch

from rapid.config import EngineConfig
from rapid.model.config import ModelConfig
from rapid.model.loader import build_model, parameter_specs, resolve_dtype
from rapid.protocol import (
    DecodeInput, DecodeStep, Dropped, GrantBlocks, PrefillBatch, PrefillDone, PrefillInput, SampledToken, SeqWork,
    Shutdown, StartDecode, StopDecode, Transferred, WorkerReady,
)
from rapid.runtime import ipc
from rapid.runtime.loading import kv_block_bytes, make_attention_backend, num_kv_blocks, resolve_device
from rapid.runtime.memory import (
    ProcessMemory, max_reserved_bytes, non_torch_bytes, process_memory, profile_forward_memory, rounded,
)
from rapid.runtime.model_runner import ModelRunner
from rapid.runtime.request import Request
from rapid.runtime.shared import ArenaHandle, SharedArena, plan_layout

logger = logging.getLogger(__name__)


@dataclass
class WorkerArgs:
    """What a spawned process is given (as msgspec-encoded bytes, never pickle over a socket)."""

    name: str
    config: EngineConfig
    endpoints: dict[str, str]
    log_path: str
    log_level: int
    eos_token_ids: tuple[int, ...]
    env: dict[str, str]
    arena: ArenaHandle | None = None  # the arena to map (rapid prefill worker) or the peer's (disagg decode)
    num_blocks: int = 0  # blocks in that arena's KV pool
    device: str | None = None  # this process's device (disagg: prefill cuda:0, decode cuda:1)
    peer_num_blocks: int = 0  # core, disagg: blocks in the decode pool


def encode_args(args: WorkerArgs) -> bytes:
    return msgspec.msgpack.encode(args)


def decode_args(raw: bytes) -> WorkerArgs:
    return msgspec.msgpack.decode(raw, type=WorkerArgs)


def arena_layout(config: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, num_blocks: int):
    """Where each weight and the KV pool live inside the shared arena (same on both sides)."""
    from rapid.attention.metadata import kv_pool_shape

    entries = parameter_specs(model_cfg, dtype)
    entries.append(("kv_pool", kv_pool_shape(model_cfg.num_layers, num_blocks, config.cache.block_size,
                                             model_cfg.num_kv_heads, model_cfg.head_dim), dtype))
    return plan_layout(entries)


def profile_for_arena(config: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      roles: tuple[str, ...]) -> tuple[int, list[ProcessMemory]]:
    """The owner, before the arena exists (its size depends on the KV budget): profile a throw-away model
    (empty weights in private memory) for each process named in `roles`, measure the memory outside torch
    (while this is the engine's only CUDA process), and free it all.

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
    peaks = profile_forward_memory(model, device, sched.max_num_batched_tokens, sched.max_num_seqs,
                                   sched.max_model_len, config.cache.block_size)
    non_torch = non_torch_bytes(device)
    del model, views
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # the peak reported at start-up covers the arena onwards
    return private, [process_memory(role, peaks, non_torch, prefill=role == "prefill", decode=role == "decode",
                                    graphs=not config.enforce_eager) for role in roles]


class SharedModel:
    """The model and KV pool inside a shared arena: created by the owner, mapped by an importer."""

    def __init__(self, args: WorkerArgs, owner: bool):
        config = args.config
        self.device = torch.device(args.device) if args.device else resolve_device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model_cfg = ModelConfig.from_folder(config.model)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.allowed_bytes: dict[str, int] = {}  # owner on CUDA: the torch bytes the KV sizing allows each process
        private, processes = 0, []
        if owner:
            # rapid: this arena serves both workers; disagg: this worker alone (each owns its GPU and arena).
            roles = ("decode", "prefill") if config.mode == "rapid" else (args.name,)
            private, processes = profile_for_arena(config, model_cfg, self.dtype, self.device, roles)
            _, weights = plan_layout(parameter_specs(model_cfg, self.dtype))
            self.num_blocks = num_kv_blocks(config, model_cfg, self.dtype, self.device,
                                            weights + private * len(processes), processes)
        else:
            self.num_blocks = args.num_blocks
        slots, total = arena_layout(config, model_cfg, self.dtype, self.num_blocks)
        if processes:  # the owner's allocator holds the arena; an importer's does not (a CUDA IPC mapping)
            self.allowed_bytes = {p.name: private + p.torch_bytes + (rounded(total) if p.name == args.name else 0)
                                for p in processes}
        self.arena = SharedArena.create(total, self.device) if owner else SharedArena.open(args.arena, self.device)
        views = {name: self.arena.view(slot) for name, slot in slots.items()}
        self.kv_pool = views.pop("kv_pool")
        if owner:
            self.kv_pool.zero_()  # unwritten slots must hold finite values (masked, but multiplied by 0)
        backend = make_attention_backend(config, model_cfg, self.device)
        self.model = build_model(config.model, backend, self.dtype, self.device,
                                 max_positions=config.scheduler.max_model_len, param_views=views, load=owner,
                                 load_format=config.load_format)
        logger.info("%s the shared arena: %.1f MiB (%d KV blocks of %d bytes) on %s",
                    "created" if owner else "mapped", total / 2**20, self.num_blocks,
                    kv_block_bytes(model_cfg, config.cache.block_size, self.dtype), self.device)

    def close(self) -> None:
        self.model = self.kv_pool = None
        self.arena.close()



def _child_setup(args: WorkerArgs) -> None:
    for key, value in args.env.items():
        os.environ[key] = value
    ipc.die_with_parent()
    ipc.setup_child_logging(args.log_path, args.name, args.log_level)
    if args.config.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def _sync(device: torch.device) -> None:
    """Make this worker's writes visible to the other process before telling anyone they are done."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def open_peer_pool(args: WorkerArgs, device: torch.device) -> tuple[SharedArena, torch.Tensor]:
    """disagg: map the prefill worker's arena and return its KV pool (the source of hand-off copies)."""
    model_cfg = ModelConfig.from_folder(args.config.model)
    dtype = resolve_dtype(args.config.dtype, device)
    slots, _ = arena_layout(args.config, model_cfg, dtype, args.num_blocks)
    arena = SharedArena.open(args.arena, device)
    return arena, arena.view(slots["kv_pool"])


@contextlib.contextmanager
def worker_process(raw_args: bytes, inbox_name: str, inbox_type, role: str):
    """A worker's lifetime: sockets, the shared model, a ModelRunner with its graphs; all closed at exit.

    rapid: the decode worker owns the arena and the prefill worker maps it; disagg: each owns its own.
    Yields (args, shared model, runner, inbox, results channel, ready channel).
    """
    args = decode_args(raw_args)
    _child_setup(args)
    import zmq

    from rapid.compile import prepare_model

    ctx = zmq.Context()
    inbox = ipc.Channel(ctx, zmq.PULL, args.endpoints[inbox_name], bind=True, decode_type=inbox_type)
    results = ipc.Channel(ctx, zmq.PUSH, args.endpoints["worker_out"], bind=False)
    ready = ipc.Channel(ctx, zmq.PUSH, args.endpoints["ready"], bind=False)
    shared = None
    try:
        owner = role == "decode" or args.config.mode == "disagg"
        shared = SharedModel(args, owner=owner)
        # decode: whole-step decode graphs; prefill: piecewise graphs for prefill batches.
        graphs = prepare_model(shared.model, shared.kv_pool, args.config, decode_graphs=role == "decode",
                               prefill_graphs=role == "prefill")
        runner = ModelRunner(shared.model, shared.kv_pool, args.config.cache.block_size, args.config.seed,
                             graph_runners=graphs, eos_token_ids=args.eos_token_ids)
        yield args, shared, runner, inbox, results, ready
    except Exception:
        logger.exception("%s worker failed", args.name)
        raise
    finally:
        if shared is not None:
            shared.close()
        for ch in (inbox, results, ready):
            ch.close()
        ctx.term()


# ------------------------------------------------------------------------------ prefill worker
def prefill_main(raw_args: bytes) -> None:
    with worker_process(raw_args, "prefill_in", PrefillInput, role="prefill") as (args, shared, runner, inbox,
                                                                                      results, ready):
        owns = args.config.mode == "disagg"
        ready.send(WorkerReady(args.name, os.getpid(), arena=shared.arena.handle if owns else None,
                               num_blocks=shared.num_blocks, max_reserved_bytes=max_reserved_bytes(shared.device),
                               allowed_bytes=shared.allowed_bytes))
        while True:
            msg = inbox.recv(timeout_ms=1000)
            if msg is None:
                continue
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, PrefillBatch):
                t0 = time.time()
                sampled = runner.execute(msg.work)
                _sync(shared.device)
                results.send(PrefillDone(msg.batch_id, sampled, t0, time.time()))


# ------------------------------------------------------------------------------ decode worker
class DecodeLoop:
    """The decode worker's running batch: steps every request that has the blocks for its next token."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, eos_token_ids: tuple[int, ...]):
        self.runner = runner
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.eos_token_ids = eos_token_ids
        self.running: dict[str, Request] = {}
        self.pending_handoff: dict[str, float] = {}  # request -> prefill end time
        self.last_step_end: float | None = None
        self.peer_kv: torch.Tensor | None = None  # disagg: the prefill worker's KV pool (hand-off source)
        self.transferred: list[str] = []

    def handle(self, msg) -> list[str]:
        """Apply one message from the core; return request ids dropped by it."""
        if isinstance(msg, StartDecode):
            req = Request(msg.request_id, msg.prompt_token_ids, msg.params, self.eos_token_ids,
                          output_token_ids=list(msg.output_token_ids), block_ids=list(msg.block_ids))
            req.num_computed_tokens = req.num_tokens - 1
            if msg.src_block_ids:  # disagg: move the KV from the prefill pool into this worker's pool
                kv = self.runner.kv_pool  # [L, 2, NB, BS, KVH, D]
                src = torch.tensor(msg.src_block_ids, device=self.peer_kv.device)
                dst = torch.tensor(req.block_ids[: len(msg.src_block_ids)], device=kv.device)
                kv.index_copy_(2, dst, self.peer_kv.index_select(2, src).to(kv.device))
                self.transferred.append(req.request_id)
            self.running[req.request_id] = req
            self.pending_handoff[req.request_id] = msg.prefill_end
        elif isinstance(msg, GrantBlocks):
            req = self.running.get(msg.request_id)
            if req is not None:
                req.block_ids.extend(msg.block_ids)
        elif isinstance(msg, StopDecode):
            for rid in msg.request_ids:
                self.running.pop(rid, None)
                self.pending_handoff.pop(rid, None)
            return list(msg.request_ids)
        return []

    def runnable(self) -> list[Request]:
        bs = self.block_size
        return [r for r in self.running.values() if len(r.block_ids) * bs >= r.num_tokens]

    def step(self, batch: list[Request]) -> DecodeStep:
        t0 = time.time()
        idle = 0.0 if self.last_step_end is None else t0 - self.last_step_end
        work = [
            SeqWork(r.request_id, [r.all_token_ids[-1]], r.num_tokens - 1, r.block_ids, True, r.params,
                    len(r.output_token_ids), r.prompt_token_ids, r.output_token_ids)
            for r in batch
        ]
        sampled: list[SampledToken] = self.runner.execute(work)
        t1 = time.time()
        finished, handoffs = [], []
        for req, tok in zip(batch, sampled):
            if req.request_id in self.pending_handoff:
                handoffs.append(t0 - self.pending_handoff.pop(req.request_id))
            req.num_computed_tokens += 1
            reason = req.append_token(tok.token_id)
            if reason is not None or req.num_tokens >= self.max_model_len:
                finished.append(req.request_id)
                del self.running[req.request_id]
        self.last_step_end = t1
        return DecodeStep(sampled, finished, t0, t1, idle_gap_s=idle, handoffs=handoffs)


def decode_main(raw_args: bytes) -> None:
    with worker_process(raw_args, "decode_in", DecodeInput, role="decode") as (args, shared, runner, inbox,
                                                                                    results, ready):
        loop = DecodeLoop(runner, args.config, args.eos_token_ids)
        peer = None
        if args.config.mode == "disagg":
            peer, loop.peer_kv = open_peer_pool(args, torch.device(args.arena.cuda_args[0]) if args.arena.kind == "cuda"
                                                else shared.device)
        ready.send(WorkerReady(args.name, os.getpid(), arena=shared.arena.handle, num_blocks=shared.num_blocks,
                               max_reserved_bytes=max_reserved_bytes(shared.device),
                               allowed_bytes=shared.allowed_bytes))
        while True:
            batch = loop.runnable()
            # Never wait for the core while there is work: poll without blocking between steps.
            msgs = inbox.drain() if batch else ([m] if (m := inbox.recv(timeout_ms=100)) is not None else [])
            if any(isinstance(m, Shutdown) for m in msgs):
                break
            dropped = [rid for m in msgs for rid in loop.handle(m)]
            if loop.transferred:  # disagg: the copies are complete, the prefill blocks may be reused
                _sync(shared.device)
                results.send(Transferred(loop.transferred))
                loop.transferred = []
            if dropped:
                results.send(Dropped(dropped))
            if msgs:
                batch = loop.runnable()
            if not batch:
                loop.last_step_end = None  # idle by lack of work, not host overhead
                continue
            results.send(loop.step(batch[: args.config.scheduler.max_num_seqs]))
        if peer is not None:
            loop.peer_kv = None
            peer.close()


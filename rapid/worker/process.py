"""The worker processes of modes 'rapid' and 'disagg': a decode worker and a prefill worker (rapid: one or two).

rapid: the decode worker owns the arena (weights + KV pool) and the prefill worker maps it; disagg:
each owns its own arena on its own GPU and the decode worker maps the prefill worker's to copy KV out.
Each loop keeps its device busy without waiting on the engine core between steps.

Fault injection (tests and bench/fault_probe.py only; off unless set): RAPID_FAULT_INJECT=ROLE[:N] makes
worker ROLE (prefill or decode) store out of bounds on its Nth batch / step (default 1): on CUDA a Triton
kernel writes far outside its buffer (an illegal-address fault, fatal to the CUDA context and, under MPS,
to every client of the server); on the CPU a store to address 16 (SIGSEGV). Read at the worker's start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from rapid.engine import ipc
from rapid.protocol.engine import Shutdown
from rapid.protocol.worker import (
    DecodeInput, DeviceTime, PrefillBatch, PrefillDone, PrefillInput, Transferred, WorkerArgs, WorkerReady,
    decode_args,
)
from rapid.worker.decode_loop import DecodeLoop
from rapid.worker.gc_heap import freeze_startup_heap
from rapid.worker.grammar import GrammarBook
from rapid.worker.memory import max_reserved_bytes
from rapid.worker.model_setup import ModelSetup, open_peer_pool

logger = logging.getLogger(__name__)
FAULT_ENV = "RAPID_FAULT_INJECT"


def fault_step(role: str) -> int | None:
    """The batch / step (1-based) on which RAPID_FAULT_INJECT asks this worker to fault; None: never."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, nth = spec.partition(":")
    if name != role:
        return None
    if not (nth or "1").isdigit() or int(nth or "1") < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected ROLE[:N] with N >= 1")
    return int(nth or "1")


def inject_fault(role: str, step: int, device: torch.device) -> None:
    """Store out of bounds on purpose (see the module doc); the process is not expected to survive it."""
    logger.error("%s: %s worker stores out of bounds on purpose at batch/step %d", FAULT_ENV, role, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if device.type != "cuda":
        import ctypes

        ctypes.memset(16, 0, 8)  # an invalid store: SIGSEGV
        return
    import triton
    import triton.language as tl

    @triton.jit
    def oob_store(ptr, offset):
        tl.store(ptr + offset, 1.0)

    buf = torch.zeros(1, dtype=torch.float32, device=device)
    try:
        oob_store[(1,)](buf, 1 << 40)  # 4 TiB past the buffer
    except Exception as e:  # noqa: BLE001 - Triton could not build it: an out-of-range index (a device assert)
        logger.error("%s: the Triton kernel failed (%s); indexing out of range instead", FAULT_ENV, e)
        buf[torch.full((1,), 1 << 40, device=device)] = 1.0
    torch.cuda.synchronize(device)  # raises the fault here


def sync_device(device: torch.device) -> None:
    """Make this worker's writes visible to the other process before telling anyone they are done."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def owns_arena(args: WorkerArgs) -> bool:
    """rapid: the decode worker owns the one arena; disagg: each worker owns its own."""
    return args.name == "decode" or args.config.mode == "disagg"


@contextlib.contextmanager
def worker_process(raw_args: bytes, inbox_type):
    """A worker's lifetime: sockets, its model in the arena, a ModelRunner with its graphs; all closed at exit.
    Its inbox is the channel named for its role (decode_in, prefill_in, prefill2_in: the second prefill worker).

    Yields (args, setup, runner, inbox, results channel, ready channel).
    """
    args = decode_args(raw_args)
    ipc.child_setup(args.log_path, args.name, args.log_level)
    if args.config.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    import zmq

    ctx = zmq.Context()
    inbox = ipc.Channel(ctx, zmq.PULL, args.endpoints[f"{args.name}_in"], bind=True, decode_type=inbox_type)
    results = ipc.Channel(ctx, zmq.PUSH, args.endpoints["worker_out"], bind=False)
    ready = ipc.Channel(ctx, zmq.PUSH, args.endpoints["ready"], bind=False)
    setup = None
    try:
        owner = owns_arena(args)
        setup = ModelSetup(args.config, args.name, arena=None if owner else args.arena, num_blocks=args.num_blocks,
                           device=args.device)
        runner = setup.make_runner(args.eos_token_ids)
        yield args, setup, runner, inbox, results, ready
    except Exception:
        logger.exception("%s worker failed", args.name)
        raise
    finally:
        _close_quietly(setup, (inbox, results, ready), ctx)  # rapid.engine.child then logs the cause last


def _close_quietly(setup, channels, ctx) -> None:
    """Close everything; a failure here (a broken device may fail again) is logged, never raised over the cause."""
    try:
        if setup is not None:
            setup.close()
        for ch in channels:
            ch.close()
        ctx.term()
    except Exception as e:  # noqa: BLE001
        logger.warning("closing the worker's resources failed too: %s: %s", type(e).__name__, e)


def _ready(args: WorkerArgs, setup: ModelSetup) -> WorkerReady:
    return WorkerReady(args.name, os.getpid(), arena=setup.arena.handle if owns_arena(args) else None,
                       num_blocks=setup.num_blocks, max_reserved_bytes=max_reserved_bytes(setup.device),
                       allowed_bytes=setup.allowed_bytes)


def prefill_main(raw_args: bytes) -> None:
    with worker_process(raw_args, PrefillInput) as (args, setup, runner, inbox, results, ready):
        grammars = runner.grammars = GrammarBook(args.config.tokenizer, args.eos_token_ids)  # structured outputs
        freeze_startup_heap(args.name)
        ready.send(_ready(args, setup))
        fault_at, batches, last_end = fault_step(args.name), 0, None
        while True:
            msg = inbox.recv(timeout_ms=1000)
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, PrefillBatch):
                batches += 1
                if batches == fault_at:
                    inject_fault(args.name, batches, setup.device)
                t0 = time.time()
                launched = runner.launch(msg.work)
                host_s = time.time() - t0  # enqueueing the forward pass and sampling (eager attention included)
                sampled = runner.collect(launched)
                grammars.retain(())  # the decode worker takes the requests over (it replays their tokens)
                sync_device(setup.device)  # the KV is complete before the core hands the request to decode
                t_end = time.time()
                times = runner.device_time(launched)
                results.send(PrefillDone(msg.batch_id, sampled, t0, t_end,
                                         num_tokens=msg.num_tokens, host_s=max(host_s, 1e-9),
                                         idle_gap_s=0.0 if last_end is None else t0 - last_end,
                                         device=DeviceTime(args.name, *times, eager=launched.eager)
                                         if times is not None else None))
                last_end = t_end


def decode_main(raw_args: bytes) -> None:
    with worker_process(raw_args, DecodeInput) as (args, setup, runner, inbox, results, ready):
        loop = DecodeLoop(runner, setup.config, args.eos_token_ids, kv_read_elsewhere=True)
        peer = None
        if args.config.mode == "disagg":
            peer_device = torch.device(args.arena.cuda_args[0]) if args.arena.kind == "cuda" else setup.device
            peer, loop.peer_kv = open_peer_pool(args.config, args.arena, args.num_blocks, peer_device)
        freeze_startup_heap(args.name)
        ready.send(_ready(args, setup))
        fault_at, steps = fault_step(args.name), 0
        while True:
            # Never wait for the core while there is work: poll without blocking between steps.
            busy = loop.has_work()
            if not busy:
                loop.note_no_work()  # before waiting: work arriving in the wait does not follow a host gap
            msgs = inbox.drain() if busy else ([m] if (m := inbox.recv(timeout_ms=100)) is not None else [])
            if any(isinstance(m, Shutdown) for m in msgs):
                break
            dropped = [d for m in msgs if (d := loop.handle(m)) is not None]
            if loop.transferred:  # disagg: the copies are complete, the prefill blocks may be reused
                sync_device(setup.device)
                results.send(Transferred(loop.transferred))
                loop.transferred = []
            for d in dropped:
                results.send(d)
            if not loop.has_work():
                loop.note_no_work()
                continue
            steps += 1
            if steps == fault_at:
                inject_fault(args.name, steps, setup.device)
            for out in loop.step():  # an inline PrefillDone comes once its step's KV writes are complete
                results.send(out)
        if peer is not None:
            loop.peer_kv = None
            peer.close()

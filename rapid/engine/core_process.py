"""The engine-core process: the EngineCore behind ZeroMQ sockets.

Frontend -> core_in (AddRequest, AbortRequest, GetStats, SetTokenBudget, Shutdown); core_out -> frontend
(EngineOutputs, Stats). Modes 'rapid' and 'disagg': workers on prefill_in (and prefill2_in) / decode_in down,
worker_out up, and no torch in this process. Mode 'hybrid' with engine_process: the model and its one executor run
here, as rapid.engine.inproc runs them in the user's process.
"""

from __future__ import annotations

import logging
import os

import zmq

from rapid.engine import ipc, launch
from rapid.engine.core import EngineCore
from rapid.engine.inproc import HybridExecutor
from rapid.protocol.engine import (
    AbortRequest, AddRequest, CoreInput, EngineOutputs, GetStats, RequestDelta, SetTokenBudget, Shutdown,
)
from rapid.protocol.worker import WorkerArgs, WorkerReady, WorkerResult, decode_args
from rapid.worker.gc_heap import freeze_startup_heap

logger = logging.getLogger(__name__)


class ZmqWorkers:
    """The workers as the core sees them: a PUSH socket per lane, one PULL socket for every result."""

    def __init__(self, ctx: zmq.Context, endpoints: dict[str, str], lanes: tuple[str, ...]):
        self.lanes = {lane: ipc.Channel(ctx, zmq.PUSH, endpoints[f"{lane}_in"], bind=False) for lane in lanes}
        self.results = ipc.Channel(ctx, zmq.PULL, endpoints["worker_out"], bind=True, decode_type=WorkerResult)

    def send(self, lane: str, msg) -> None:
        self.lanes[lane].send(msg)

    def poll(self) -> list:  # the waiting is the core loop's zmq poll (poll_timeout_ms)
        return self.results.drain()

    def close(self) -> None:
        for ch in (*self.lanes.values(), self.results):
            ch.close()


def _handle(core: EngineCore, msg, outbox: ipc.Channel) -> tuple[bool, list[RequestDelta]]:
    """Apply one frontend message; (keep running, deltas it produced)."""
    if isinstance(msg, AddRequest):
        try:
            core.add_request(msg)
        except ValueError as e:  # the frontend checks first; this is the backstop
            return True, [RequestDelta(msg.request_id, [], "", finished=True, finish_reason="abort", error=str(e))]
    elif isinstance(msg, AbortRequest):
        return True, core.abort(msg.request_ids)
    elif isinstance(msg, GetStats):
        outbox.send(core.get_stats())
    elif isinstance(msg, SetTokenBudget):
        try:
            core.set_token_budget(msg.max_num_batched_tokens)
        except ValueError as e:
            logger.warning("%s", e)
    elif isinstance(msg, Shutdown):
        return False, []
    return True, []


IDLE_POLL_MS = 50  # how long the core waits on its inbox (and the workers' results) when nothing is due


def poll_timeout_ms(core: EngineCore, executor: HybridExecutor | None) -> int:
    """0 while work is due that no socket would announce: results just applied (more may follow at once), or a
    hybrid step in flight (with async scheduling a step can launch and read nothing back)."""
    return 0 if core.progressed or (executor is not None and executor.busy()) else IDLE_POLL_MS


def _memory_fields(executor: HybridExecutor, name: str) -> dict:
    """The ready handshake's memory figures: MPClient checks each process's peak against its plan by its name."""
    from rapid.worker.memory import max_reserved_bytes

    return {"max_reserved_bytes": max_reserved_bytes(executor.setup.device),
            "allowed_bytes": {name: executor.allowed_bytes}}


def core_main(raw_args: bytes) -> None:
    args: WorkerArgs = decode_args(raw_args)
    ipc.child_setup(args.log_path, args.name, args.log_level)
    from rapid.core.tokenizer import load_tokenizer

    ctx = zmq.Context()
    inbox = ipc.Channel(ctx, zmq.PULL, args.endpoints["core_in"], bind=True, decode_type=CoreInput)
    outbox = ipc.Channel(ctx, zmq.PUSH, args.endpoints["core_out"], bind=False)
    ready = ipc.Channel(ctx, zmq.PUSH, args.endpoints["ready"], bind=False)
    executor = workers = None
    try:
        if args.config.mode == "hybrid":  # inside the try: a failure to load the model logs its traceback
            executor = HybridExecutor(args.config, args.eos_token_ids)
        workers = executor.workers if executor else ZmqWorkers(ctx, args.endpoints, launch.workers(args.config))
        num_blocks = executor.setup.num_blocks if executor else args.num_blocks
        core = EngineCore(args.config, load_tokenizer(args.config.tokenizer), args.eos_token_ids, workers,
                          num_blocks, num_decode_blocks=args.peer_num_blocks)
        freeze_startup_heap(args.name)
        ready.send(WorkerReady(args.name, os.getpid(), num_blocks=core.num_blocks,
                               max_num_seqs=core.config.scheduler.max_num_seqs,
                               **(_memory_fields(executor, args.name) if executor else {})))
        poller = zmq.Poller()
        poller.register(inbox.sock, zmq.POLLIN)
        if executor is None:
            poller.register(workers.results.sock, zmq.POLLIN)
        running = True
        while running:
            poller.poll(poll_timeout_ms(core, executor))
            deltas: list[RequestDelta] = []
            for msg in inbox.drain():
                running, produced = _handle(core, msg, outbox)
                deltas += produced
                if not running:
                    break
            deltas += core.step()
            if deltas:
                outbox.send(EngineOutputs(deltas))
    except Exception:
        logger.exception("engine core failed")
        raise
    finally:
        for ch in (inbox, outbox, ready):
            ch.close()
        if executor:
            executor.close()
        elif workers:
            workers.close()
        ctx.term()

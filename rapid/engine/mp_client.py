"""MPClient: the frontend side of modes 'rapid' and 'disagg'. It starts and supervises the processes that
rapid/engine/launch.py declares (the engine core and its two workers) in stage order.

Each reports ready through a handshake with a timeout. A process that dies is noticed within a
poll interval (0.1 s): every in-flight request ends with an EngineDeadError naming the process
and its exit code, and everything else is shut down (the engine is then dead: create a new LLM).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import msgspec
import zmq

from rapid.config import EngineConfig
from rapid.core.request import check_fits
from rapid.engine import ipc, launch
from rapid.engine.client import EngineClient, EngineDeadError
from rapid.engine.mps import MpsDaemon, uses_cuda, worker_env
from rapid.protocol.engine import (
    AbortRequest, AddRequest, CoreOutput, EngineDead, EngineOutputs, GetStats, RequestDelta, SetTokenBudget, Shutdown,
    Stats,
)
from rapid.protocol.worker import WorkerArgs, WorkerReady, encode_args

logger = logging.getLogger(__name__)
POLL_MS = 100


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: str

    def alive(self) -> bool:
        return self.process.poll() is None


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


class MPClient(EngineClient):
    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids):
        if config.scheduler.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.dead_reason: str | None = None
        self.children: list[ChildProcess] = []
        self.shm_names: list[str] = []
        self.in_flight: set[str] = set()
        self._buffered: list[RequestDelta] = []
        self._closed = False
        self.dir = ipc.private_socket_dir()
        names = ("core_in", "core_out", "worker_out", "prefill_in", "decode_in", "ready")
        self.endpoints = {n: ipc.endpoint(self.dir, n) for n in names}
        self.ctx = zmq.Context()
        self.ready = ipc.Channel(self.ctx, zmq.PULL, self.endpoints["ready"], bind=True, decode_type=WorkerReady)
        self.out = ipc.Channel(self.ctx, zmq.PULL, self.endpoints["core_out"], bind=True, decode_type=CoreOutput)
        self.inp = None
        self.worker_lines: dict[str, ipc.Channel] = {}  # direct lines to the workers, for shutdown only
        self.started: dict[str, WorkerReady] = {}  # every process's ready handshake (pid, KV blocks, memory peak)
        self.mps = None
        self.devices: dict[str, str] = {}
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start-up
    def _spawn(self, name: str, arena=None, num_blocks: int = 0, peer_num_blocks: int = 0) -> ChildProcess:
        log_path = f"{self.dir}/{name}.log"
        args = WorkerArgs(name=name, config=self.config, endpoints=self.endpoints, log_path=log_path,
                          log_level=logging.getLogger("rapid").getEffectiveLevel() or logging.INFO,
                          eos_token_ids=self.eos_token_ids, env=worker_env(self.config, name, self.mps), arena=arena,
                          num_blocks=num_blocks, device=self.devices.get(name), peer_num_blocks=peer_num_blocks)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "rapid.engine.child", name], stdin=subprocess.PIPE,
                                    stdout=log, stderr=subprocess.STDOUT, close_fds=True)
        proc.stdin.write(encode_args(args))
        proc.stdin.close()
        child = ChildProcess(name, proc, log_path)
        self.children.append(child)
        return child

    def _wait_ready(self, *children: ChildProcess) -> dict[str, WorkerReady]:
        """Wait for each child's WorkerReady; an exit or the timeout is an error naming the process."""
        deadline = time.monotonic() + self.config.rapid.worker_start_timeout_s
        got: dict[str, WorkerReady] = {}
        while len(got) < len(children):
            msg = self.ready.recv(timeout_ms=POLL_MS)
            if isinstance(msg, WorkerReady):
                got[msg.name] = msg
                self.started[msg.name] = msg
            for child in children:
                if child.name not in got and not child.alive():
                    raise RuntimeError(
                        f"{child.name} process (pid {child.process.pid}) exited with code {child.process.returncode} "
                        f"during start-up; its last log lines:\n{ipc.tail(child.log_path)}"
                    )
            if time.monotonic() > deadline:
                late = next(c for c in children if c.name not in got)
                raise TimeoutError(
                    f"{late.name} process (pid {late.process.pid}) was not ready within "
                    f"{self.config.rapid.worker_start_timeout_s:g}s; its last log lines:\n{ipc.tail(late.log_path)}"
                )
        return got

    def _start(self) -> None:
        cuda = uses_cuda(self.config)
        if cuda:
            ipc.check_no_expandable_segments()
        self.mps = MpsDaemon.for_config(self.config)
        self.devices = launch.devices(self.config, cuda)
        t0 = time.perf_counter()
        for stage in launch.stages(self.config.mode):
            spawned = [self._spawn(role.name, **launch.spawn_fields(self.config.mode, role, self.started))
                       for role in stage]
            for ready in self._wait_ready(*spawned).values():
                self._track_arena(ready)
        self.num_blocks = self.started["core"].num_blocks
        self.inp = ipc.Channel(self.ctx, zmq.PUSH, self.endpoints["core_in"], bind=False)
        # Direct lines to the workers, only for shutdown (they normally listen to the core).
        self.worker_lines = {n: ipc.Channel(self.ctx, zmq.PUSH, self.endpoints[f"{n}_in"], bind=False)
                             for n in ("prefill", "decode")}
        if self.mps is not None:
            self.mps.check_clients([c.process.pid for c in self.children if c.name in ("decode", "prefill")])
        self._check_memory()
        logger.info("%s engine ready in %.1fs (%d KV blocks; sockets in %s)", self.config.mode,
                    time.perf_counter() - t0, self.num_blocks, self.dir)

    def _check_memory(self) -> None:
        """Warn about a worker whose peak torch memory at start-up went past what the KV sizing allowed it."""
        from rapid.worker.memory import check_process_memory

        plan = {name: n for ready in self.started.values() for name, n in ready.allowed_bytes.items()}
        for name, ready in self.started.items():
            check_process_memory(f"{name} process (pid {ready.pid})", ready.max_reserved_bytes, plan.get(name, 0))

    def _track_arena(self, ready: WorkerReady) -> None:
        """Remember a /dev/shm segment so that it is removed even if its owner gets killed."""
        if ready.arena is not None and ready.arena.kind == "shm":
            self.shm_names.append(ready.arena.shm_name)

    # ------------------------------------------------------------------ EngineClient
    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def add_request(self, msg: AddRequest) -> None:
        self._check_alive()
        sched = self.config.scheduler
        check_fits(msg.request_id, len(msg.prompt_token_ids), msg.params.max_tokens, sched.max_model_len,
                   self.num_blocks, self.config.cache.block_size)
        self.inp.send(msg)
        self.in_flight.add(msg.request_id)

    def abort(self, request_ids: list[str]) -> None:
        if self.dead_reason is None and self.inp is not None:
            self.inp.send(AbortRequest(list(request_ids)))

    def _dead_child(self) -> ChildProcess | None:
        return next((c for c in self.children if not c.alive()), None)

    @staticmethod
    def _death_reason(dead: ChildProcess) -> str:
        code = dead.process.returncode
        return (f"{dead.name} process (pid {dead.process.pid}) died with exit code {code}"
                f"{' (signal %d)' % -code if code is not None and code < 0 else ''}; last log lines:\n"
                f"{ipc.tail(dead.log_path, 8)}")

    def _on_death(self, reason: str) -> list[RequestDelta]:
        self.dead_reason = reason
        logger.error("%s", reason)
        deltas = [RequestDelta(rid, [], "", finished=True, finish_reason="abort", error=reason)
                  for rid in sorted(self.in_flight)]
        self.in_flight.clear()
        self._stop_children(graceful=False)
        return deltas

    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        if self._buffered:
            out, self._buffered = self._buffered, []
            return out
        self._check_alive()
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 3600.0)
        while True:
            dead = self._dead_child()  # checked on every call: a steady stream of output must not hide a death
            if dead is not None:
                return self._on_death(self._death_reason(dead))
            msg = self.out.recv(timeout_ms=POLL_MS)
            if isinstance(msg, EngineOutputs):
                for d in msg.deltas:
                    if d.finished:
                        self.in_flight.discard(d.request_id)
                return msg.deltas
            if isinstance(msg, EngineDead):
                return self._on_death(f"engine core: {msg.reason}")
            if time.monotonic() > deadline:
                return []

    def get_stats(self, timeout_s: float = 10.0) -> Stats:
        """Worker timings (prefill batches, decode steps, idle gaps, hand-offs) from the core."""
        self._check_alive()
        self.inp.send(GetStats())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.out.recv(timeout_ms=POLL_MS)
            if isinstance(msg, Stats):
                return msg
            if isinstance(msg, EngineOutputs):
                self._buffered.extend(msg.deltas)
        raise TimeoutError("the engine core did not answer GetStats")

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be a positive integer, got {max_num_batched_tokens!r}")
        self._check_alive()
        self.inp.send(SetTokenBudget(max_num_batched_tokens))

    def check_health(self) -> None:
        self._check_alive()
        dead = self._dead_child()
        if dead is not None:
            self._buffered.extend(self._on_death(self._death_reason(dead)))
            self._check_alive()

    # ------------------------------------------------------------------ shutdown
    def _stop_children(self, graceful: bool = True) -> None:
        """Importers (prefill, core) first, then the owner of the shared arena (decode).

        graceful=False (a process already died, the engine is dead): SIGTERM at once, no handshake.
        """
        stages = launch.stop_order(self.config.mode)
        for stage in stages:
            group = [c for c in self.children if c.name in stage]
            for child in group:
                if child.alive() and graceful:
                    if child.name == "core":
                        if self.inp is not None:
                            self.inp.send(Shutdown())
                    else:
                        self._send_worker_shutdown(child.name)
            for child in group:
                if graceful:
                    _wait(child.process, 5)
                if child.alive():
                    child.process.terminate()
                    _wait(child.process, 3)
                if child.alive():
                    child.process.kill()
                    _wait(child.process, 3)
        self.children = []
        for name in self.shm_names:  # the owner unlinks; this covers an owner that was killed
            ipc.unlink_shm(name)
        self.shm_names = []

    def _send_worker_shutdown(self, name: str) -> None:
        line = self.worker_lines.get(name)
        if line is not None:
            try:
                line.sock.send(msgspec.msgpack.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_children()
        finally:
            for ch in (self.inp, self.out, self.ready, *self.worker_lines.values()):
                if ch is not None:
                    ch.close()
            self.ctx.term()
            if self.mps is not None:
                self.mps.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

"""MPClient: the frontend side of modes 'rapid' and 'disagg' (and of 'hybrid' with engine_process). It starts and
supervises the processes that rapid/engine/launch.py declares (the engine core and its workers) in stage order
(rapid/engine/processes.py).

Each reports ready through a handshake with a timeout. SIGTERM (or SIGHUP) during the start, when the
start runs in the main thread, cleans up (children stopped, socket directory removed, arena unlinked)
before the signal ends the process. A process that dies is noticed within a poll interval (0.1 s):
every in-flight request ends with an EngineDeadError naming the process and its exit code, and every
process of the engine is stopped and its arena unlinked (one MPS client's fault poisons every client
on the GPU, so they all go). Then, on the next call (add_request, get_deltas, get_stats, check_health,
set_token_budget), the engine starts all its processes again in stage order and serves new requests;
`num_restarts` (also in get_stats()) counts the restarts. After MAX_RESTARTS restarts within
RESTART_WINDOW_S the next death leaves the engine down for good with an error naming the process, its
exit code and the count. If the owner itself is killed, its reaper (rapid/engine/reaper.py) kills the children
and removes the directory and the /dev/shm segments.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections import deque

import msgspec
import zmq

from rapid.config import EngineConfig
from rapid.core.request import check_fits, truncated_prompt
from rapid.core.budget import check_token_budget
from rapid.engine import ipc, launch, reaper
from rapid.engine.client import EngineClient, EngineDeadError
from rapid.engine.mps import MpsDaemon, uses_cuda
from rapid.engine.processes import POLL_MS, ChildProcess, EngineProcesses
from rapid.protocol.engine import (
    AbortRequest, AddRequest, EngineOutputs, GetStats, RequestDelta, SetTokenBudget, Stats,
)
from rapid.protocol.worker import WorkerReady

logger = logging.getLogger(__name__)
MAX_RESTARTS = 3  # restarts allowed within RESTART_WINDOW_S; the next death leaves the engine down
RESTART_WINDOW_S = 60.0
STOPPING = "(the engine is stopping: its processes are not restarted)"  # a death after stop_restarts

__all__ = ["MPClient", "MAX_RESTARTS", "RESTART_WINDOW_S"]


class MPClient(EngineClient):
    def __init__(self, config: EngineConfig, eos_token_ids):
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.dead_reason: str | None = None  # set: down for good
        self.num_restarts = 0
        self._restart_due: str | None = None  # set: a process died; the next call restarts them all
        self._no_restarts = False  # set by stop_restarts: the owner is stopping
        self._last_death = ""
        self._restart_times: deque[float] = deque()
        self._token_budget: int | None = None  # re-sent to a restarted core
        self.in_flight: set[str] = set()
        self._buffered: list[RequestDelta] = []
        self._closed = False
        self.procs: EngineProcesses | None = None
        self.mps: MpsDaemon | None = None
        self.devices: dict[str, str] = {}
        self.num_blocks = self.max_num_seqs = 0
        self.owner_pid = os.getpid()  # a forked copy of this client must not stop the owner's engine
        self.dir = ipc.private_socket_dir()
        self.reaper = reaper.start(self.dir)  # removes the children and /dev/shm segments if this process is killed
        self.ctx = zmq.Context()
        try:
            with ipc.start_interruptible():
                cuda = uses_cuda(config)
                if cuda and config.mode != "hybrid":  # hybrid's one process shares no memory through IPC
                    ipc.check_no_expandable_segments()
                # a daemon this engine starts is recorded first: the reaper stops it if this process is killed
                self.mps = MpsDaemon.for_config(config, functools.partial(reaper.record_private_mps, self.dir))
                self.devices = launch.devices(config, cuda)
                self._start_processes()
        except BaseException as e:
            self._shutdown(graceful=False)  # a failed start: nothing waits for a child that was never ready
            if isinstance(e, ipc.StartInterrupted):
                ipc.redeliver(e)
            raise

    @property
    def reaper_dir(self) -> str:
        return self.dir

    # ------------------------------------------------------------------ the current incarnation
    @property
    def children(self) -> list[ChildProcess]:
        return self.procs.children if self.procs is not None and not self.procs.stopped else []

    def stall_reason(self) -> str | None:
        children = self.children
        exited = next((c for c in children if not c.alive()), None)
        if exited is not None:  # seen before the engine's next call fails what is in flight and restarts them
            return (f"the {exited.exit_text()}: the engine fails what is in flight "
                    "and restarts its processes (or stays down) at its next call")
        stopped = next((c for c in children if c.stopped()), None)
        if stopped is None:
            return None
        return (f"the {stopped.name} process (pid {stopped.process.pid}) is stopped (SIGSTOP, or a debugger): the "
                "engine makes no progress until it is continued (SIGCONT)")

    @property
    def shm_names(self) -> list[str]:
        return self.procs.shm_names if self.procs is not None else []

    @property
    def started(self) -> dict[str, WorkerReady]:
        return self.procs.started if self.procs is not None else {}

    @property
    def endpoints(self) -> dict[str, str]:
        return self.procs.endpoints if self.procs is not None else {}

    def _start_processes(self) -> None:
        t0 = time.perf_counter()
        self.procs = EngineProcesses(self.config, self.ctx, self.dir, self.num_restarts, self.eos_token_ids,
                                     self.mps, self.devices)
        self.procs.start()
        self.num_blocks = self.procs.started["core"].num_blocks
        self.max_num_seqs = self.procs.started["core"].max_num_seqs
        self._check_memory()
        logger.info("%s engine ready in %.1fs (%d KV blocks, max_num_seqs %d; sockets in %s)", self.config.mode,
                    time.perf_counter() - t0, self.num_blocks, self.max_num_seqs, self.dir)

    def _check_memory(self) -> None:
        """Warn about a worker whose peak torch memory at start-up went past what the KV sizing allowed it."""
        from rapid.worker.memory_check import check_process_memory

        plan = {name: n for ready in self.started.values() for name, n in ready.allowed_bytes.items()}
        for name, ready in self.started.items():
            check_process_memory(f"{name} process (pid {ready.pid})", ready.max_reserved_bytes, plan.get(name, 0))

    # ------------------------------------------------------------------ deaths and restarts
    def _ensure_running(self) -> None:
        self._check_owner()
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._restart_due is not None:
            self._restart()

    def _on_death(self, reason: str) -> list[RequestDelta]:
        """Stop every process, unlink the arena; fail what was in flight; schedule a restart or stay down."""
        self.procs.stop(graceful=False)
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_S:
            self._restart_times.popleft()
        recent = len(self._restart_times)
        if self._closed:  # shutdown() stopped the processes under another thread's call: not a crash
            self.dead_reason = self._last_death = "the engine was shut down"
        elif self._no_restarts:
            self.dead_reason = self._last_death = f"{reason}\n{STOPPING}"
        elif recent >= MAX_RESTARTS:
            self.dead_reason = (f"{reason}\n(the engine stays down: its processes were restarted {recent} time(s) in "
                                f"the last {RESTART_WINDOW_S:g} s, the limit is {MAX_RESTARTS}; create a new LLM)")
            self._last_death = self.dead_reason
        else:
            self._restart_due = reason
            self._last_death = (f"{reason}\n(the engine restarts its processes: restart {recent + 1} of at most "
                                f"{MAX_RESTARTS} in {RESTART_WINDOW_S:g} s)")
        if not self._closed:
            logger.error("%s", self._last_death)
        deltas = [RequestDelta(rid, [], "", finished=True, finish_reason="abort", error=self._last_death)
                  for rid in sorted(self.in_flight)]
        self.in_flight.clear()
        return deltas

    def _restart(self) -> None:
        reason, self._restart_due = self._restart_due, None
        self._restart_times.append(time.monotonic())
        self.num_restarts += 1
        logger.warning("restarting the engine's processes (restart %d) after: %s", self.num_restarts,
                       reason.splitlines()[0])
        try:
            with ipc.start_interruptible():
                self._start_processes()
        except BaseException as e:
            self.procs.stop(graceful=False)
            if isinstance(e, ipc.StartInterrupted):
                self._shutdown(graceful=False)
                ipc.redeliver(e)
                raise
            if not isinstance(e, Exception):  # KeyboardInterrupt: the next call tries again
                self._restart_due = reason
                raise
            self.dead_reason = (f"restarting the engine's processes after [{reason.splitlines()[0]}] failed "
                                f"(the engine stays down): {e}")
            raise EngineDeadError(self.dead_reason) from e
        if self._token_budget is not None:
            self._send_to_core(SetTokenBudget(self._token_budget))

    def _send_to_core(self, msg) -> None:
        """Never blocks for good: a core that died with its inbox full raises EngineDeadError here."""
        self.procs.inp.send(msg, check=self._check_children)

    def _check_children(self) -> None:
        """A dead child: fail what is in flight (buffered for get_deltas) and raise EngineDeadError."""
        dead = self.procs.dead_child()
        if dead is not None:
            self._buffered.extend(self._on_death(dead.death_reason()))
            raise EngineDeadError(self._last_death)

    # ------------------------------------------------------------------ EngineClient
    def add_request(self, msg: AddRequest) -> None:
        self._ensure_running()
        sched = self.config.scheduler
        check_fits(f"request {msg.request_id}", len(truncated_prompt(msg.prompt_token_ids, msg.params)),
                   msg.params.max_tokens, sched.max_model_len, self.num_blocks, self.config.cache.block_size)
        self._send_to_core(msg)
        self.in_flight.add(msg.request_id)

    def abort(self, request_ids: list[str]) -> None:
        """Requests of a dead incarnation already ended with their error: nothing to send then."""
        self._check_owner()
        live = self.procs is not None and not self.procs.stopped and self.procs.inp is not None
        if live and not self._closed:
            try:
                self._send_to_core(AbortRequest(list(request_ids)))
            except EngineDeadError:
                pass  # the death ended them: get_deltas reports it

    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        if self._buffered:
            out, self._buffered = self._buffered, []
            return out
        self._ensure_running()
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 3600.0)
        while True:
            dead = self.procs.dead_child()  # checked on every call: a steady stream of output must not hide a death
            if dead is not None:
                return self._on_death(dead.death_reason())
            msg = self._recv_before(deadline)
            if isinstance(msg, EngineOutputs):
                return self._track(msg.deltas)
            if time.monotonic() > deadline:
                return []

    def _recv_before(self, deadline: float):
        """The core's next message (None if none came), waiting at most a poll interval and never past `deadline`."""
        left_ms = int(max(deadline - time.monotonic(), 0.0) * 1e3)
        return self.procs.out.recv(timeout_ms=min(POLL_MS, max(left_ms, 1)))

    def _track(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """Requests these deltas finish are no longer in flight (a death does not end them again)."""
        for d in deltas:
            if d.finished:
                self.in_flight.discard(d.request_id)
        return deltas

    def get_stats(self, timeout_s: float = 10.0) -> Stats:
        """Worker timings (prefill batches, decode steps, idle gaps, hand-offs) from the core; num_restarts."""
        self._ensure_running()
        self._send_to_core(GetStats())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self._recv_before(deadline)
            if isinstance(msg, Stats):
                return msgspec.structs.replace(msg, num_restarts=self.num_restarts)
            if isinstance(msg, EngineOutputs):
                self._buffered.extend(self._track(msg.deltas))
            self._check_children()
        raise TimeoutError("the engine core did not answer GetStats")

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        check_token_budget(max_num_batched_tokens, self.config.scheduler.max_num_batched_tokens)
        self._ensure_running()
        self._send_to_core(SetTokenBudget(max_num_batched_tokens))
        self._token_budget = max_num_batched_tokens

    def check_health(self) -> None:
        """EngineDeadError once for a death (then the next call restarts), and for good past the restart limit."""
        self._ensure_running()
        self._check_children()

    @property
    def _forked_copy(self) -> bool:
        """This object is a copy in a process forked from the engine's owner."""
        return os.getpid() != self.owner_pid

    def _check_owner(self) -> None:
        """A copy of this client in a process forked from its owner must not act (its sockets are dead after the
        fork; it took live workers for dead ones and started a second engine)."""
        if self._forked_copy:
            raise RuntimeError(f"this engine belongs to process {self.owner_pid}; a process forked from it cannot use "
                               "it: create the LLM in that process, or start it with the 'spawn' method")

    # ------------------------------------------------------------------ shutdown
    def stop_restarts(self) -> None:
        self._no_restarts = True
        if self._restart_due is not None:  # a death not yet acted on: the engine stays down
            self.dead_reason, self._restart_due = f"{self._restart_due}\n{STOPPING}", None

    def shutdown(self) -> None:
        self._shutdown(graceful=True)

    def _shutdown(self, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._forked_copy:  # exiting in a process forked from the owner: the engine is not its to stop
            return
        try:
            if self.procs is not None:
                self.procs.stop(graceful)
        finally:
            try:
                self.ctx.term()
                if self.mps is not None:
                    self.mps.stop()
            finally:  # the directory and the reaper go whatever failed above (a second Ctrl-C included)
                shutil.rmtree(self.dir, ignore_errors=True)
                reaper.stop(self.reaper)

"""One incarnation of a multi-process engine: its children (started in the stage order of launch.py),
its sockets and its /dev/shm arena. MPClient owns one at a time and replaces it when a process dies.

Each incarnation has endpoints of its own (names suffixed with its number) in the engine's private
directory, so nothing an earlier incarnation sent can reach a later one. Each child's stdin stays open
for its life (the parent-process watch, see ipc.watch_parent) and is recorded in the directory's
children file (for clean-up after a killed owner: rapid/engine/reaper.py, and ipc.remove_stale_dirs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import zmq

from rapid.config import EngineConfig
from rapid.engine import ipc, launch
from rapid.engine.mps import MpsDaemon, worker_env
from rapid.protocol.engine import CoreOutput, Shutdown
from rapid.protocol.worker import WorkerArgs, WorkerReady, encode_args

logger = logging.getLogger(__name__)
POLL_MS = 100
CHANNELS = ("core_in", "core_out", "worker_out", "prefill_in", "prefill2_in", "decode_in", "ready")


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: str

    def alive(self) -> bool:
        return self.process.poll() is None

    def stopped(self) -> bool:
        """Alive but stopped (SIGSTOP, SIGTSTP, a debugger): it makes no progress until continued (Linux's /proc)."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] in ("T", "t")
        except (OSError, IndexError):
            return False

    def exit_text(self) -> str:
        code = self.process.returncode
        return (f"{self.name} process (pid {self.process.pid}) died with exit code {code}"
                f"{' (signal %d)' % -code if code is not None and code < 0 else ''}")

    def death_reason(self) -> str:
        return f"{self.exit_text()}; last log lines:\n{ipc.tail(self.log_path, 8)}"


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


class EngineProcesses:
    """The children of one start; `start()` brings them up, `stop()` takes everything down (idempotent)."""

    def __init__(self, config: EngineConfig, ctx: zmq.Context, directory: str, number: int,
                 eos_token_ids: tuple[int, ...], mps: MpsDaemon | None, devices: dict[str, str]):
        self.config, self.ctx, self.dir, self.number = config, ctx, directory, number
        self.topology = launch.topology(config)  # the TOPOLOGY entry this start follows
        self.eos_token_ids, self.mps, self.devices = eos_token_ids, mps, devices
        self.endpoints = {n: ipc.endpoint(directory, f"{n}-{number}") for n in CHANNELS}
        self.children: list[ChildProcess] = []
        self.started: dict[str, WorkerReady] = {}  # every process's ready handshake (pid, KV blocks, memory peak)
        self.shm_names: list[str] = []
        self.ready = ipc.Channel(ctx, zmq.PULL, self.endpoints["ready"], bind=True, decode_type=WorkerReady)
        self.out = ipc.Channel(ctx, zmq.PULL, self.endpoints["core_out"], bind=True, decode_type=CoreOutput)
        self.inp: ipc.Channel | None = None
        self.worker_lines: dict[str, ipc.Channel] = {}  # direct lines to the workers, for shutdown only
        self.stopped = False

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Spawn every process at once (their interpreters and imports overlap), then hand each stage its
        arguments once the previous stage is ready (an importer needs the owner's published arena)."""
        stages = launch.stages(self.topology)
        spawned = {role.name: self._spawn(role.name) for stage in stages for role in stage}
        for stage in stages:
            for role in stage:
                self._send_args(spawned[role.name], **launch.spawn_fields(self.topology, role, self.started))
            for ready in self._wait_ready(*(spawned[role.name] for role in stage)).values():
                if ready.arena is not None and ready.arena.kind == "shm":  # removed even if its owner is killed
                    self.shm_names.append(ready.arena.shm_name)
        for name in self.shm_names:  # every process has mapped its arena: the name goes, the memory stays mapped
            ipc.unlink_shm(name)  # until the last of them exits, however it exits (SIGKILL of the owner included)
        self.inp = ipc.Channel(self.ctx, zmq.PUSH, self.endpoints["core_in"], bind=False)
        workers = launch.workers(self.config)
        self.worker_lines = {n: ipc.Channel(self.ctx, zmq.PUSH, self.endpoints[f"{n}_in"], bind=False) for n in workers}
        if self.mps is not None:
            self.mps.check_clients([c.process.pid for c in self.children if c.name in workers])

    def _cause_path(self, name: str) -> str:
        """Where the child `name` records an input error before it exits (ipc.write_cause)."""
        return f"{self.dir}/{name}.cause"

    def _spawn(self, name: str) -> ChildProcess:
        log_path = f"{self.dir}/{name}.log"
        with contextlib.suppress(FileNotFoundError):  # an earlier incarnation's
            os.unlink(self._cause_path(name))
        # The kernel's parent-death signal follows the parent THREAD: only safe from the main thread.
        extra = ["pdeathsig"] if threading.current_thread() is threading.main_thread() else []
        env = {**os.environ, **worker_env(self.config, name, self.mps),  # in effect before its imports (MPS share)
               ipc.CAUSE_ENV: self._cause_path(name)}
        with open(log_path, "ab") as log:
            # a process group of its own: Ctrl-C in a terminal (SIGINT to the foreground group) or a signal to the
            # owner's group reaches the owner alone, which drains and stops its children (they did die of it first)
            proc = subprocess.Popen([sys.executable, "-m", "rapid.engine.child", name, *extra], env=env,
                                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
                                    process_group=0)
        child = ChildProcess(name, proc, log_path)
        self.children.append(child)
        ipc.record_child(self.dir, proc.pid, name)
        return child

    def _send_args(self, child: ChildProcess, arena=None, num_blocks: int = 0, peer_num_blocks: int = 0) -> None:
        name = child.name
        args = WorkerArgs(name=name, config=self.config, endpoints=self.endpoints, log_path=child.log_path,
                          log_level=logging.getLogger("rapid").getEffectiveLevel() or logging.INFO,
                          eos_token_ids=self.eos_token_ids, arena=arena,
                          num_blocks=num_blocks, device=self.devices.get(name), peer_num_blocks=peer_num_blocks)
        try:
            child.process.stdin.write(ipc.frame_args(encode_args(args)))
            child.process.stdin.flush()  # stdin stays open: the child's parent watch
        except BrokenPipeError:
            pass  # it exited already: _wait_ready reports it with its log

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
                    bad_input = ipc.read_cause(self._cause_path(child.name),
                                               f"raised by the {child.name} process at start-up")
                    if bad_input is not None:
                        raise bad_input
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

    # ------------------------------------------------------------------ running
    def dead_child(self) -> ChildProcess | None:
        return next((c for c in self.children if not c.alive()), None)

    # ------------------------------------------------------------------ shutdown
    def stop(self, graceful: bool = True) -> None:
        """Importers (prefill workers, core) first, then the owner of the shared arena (decode); then any arena name
        a failed start left.

        graceful: a Shutdown handshake (5 s) with each process that reported ready. Not graceful (a process
        died, or the start failed): SIGTERM at once. Either way SIGKILL after 3 s more.
        """
        if self.stopped:
            return
        self.stopped = True
        try:
            for stage in launch.stop_order(self.topology):
                group = [c for c in self.children if c.name in stage]
                told = [c for c in group if graceful and c.alive() and c.name in self.started and self._tell_stop(c)]
                for child in group:
                    if child in told:
                        _wait(child.process, 5)
                    if child.alive():
                        child.process.terminate()
                        _wait(child.process, 3)
                    if child.alive():
                        child.process.kill()
                        _wait(child.process, 3)
        finally:
            for child in self.children:
                if child.process.stdin is not None:
                    try:
                        child.process.stdin.close()  # a child still alive (unkillable?) now exits by itself
                    except OSError:
                        pass
                ipc.unlink_shm_of(child.process.pid)  # the owner unlinks; this covers an owner that was killed
            for name in self.shm_names:
                ipc.unlink_shm(name)
            for ch in (self.inp, self.out, self.ready, *self.worker_lines.values()):
                if ch is not None:
                    ch.close()
            for address in self.endpoints.values():  # this incarnation's socket files: a restart makes new ones
                try:
                    os.unlink(address.removeprefix("ipc://"))
                except OSError:
                    pass

    def _tell_stop(self, child: ChildProcess) -> bool:
        """Send Shutdown (the core through its inbox, a worker on its direct line); whether it was sent."""
        line = self.inp if child.name == "core" else self.worker_lines.get(child.name)
        return line is not None and line.try_send(Shutdown())

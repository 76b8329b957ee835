"""CUDA MPS for mode 'rapid': start a private daemon when none runs, give each worker its SM share,
check that the workers really attached, and stop only a daemon that the engine started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable

from rapid.config import EngineConfig

logger = logging.getLogger(__name__)
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


def uses_cuda(config: EngineConfig) -> bool:
    if config.device == "cpu":
        return False
    if config.device.startswith("cuda"):
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def worker_env(config: EngineConfig, role: str, daemon: "MpsDaemon | None") -> dict[str, str]:
    """What a child process adds to its environment: the daemon's pipe and its MPS thread percentage
    (both read when the child's CUDA context starts). The parent's environment is left alone."""
    shares = {"prefill": config.rapid.prefill_sm_percentage, "prefill2": config.rapid.second_prefill_sm_percentage,
              "decode": config.rapid.decode_sm_percentage}
    pct = shares.get(role)
    if daemon is None or pct is None:
        return {}
    return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct), "CUDA_MPS_PIPE_DIRECTORY": daemon.pipe_dir}


def _control(pipe_dir: str, command: str, timeout: float = 10.0) -> str:
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir)
    res = subprocess.run(["nvidia-cuda-mps-control"], input=command + "\n", capture_output=True, text=True,
                         env=env, timeout=timeout)
    return res.stdout.strip()


def daemon_running(pipe_dir: str) -> bool:
    return os.path.exists(os.path.join(pipe_dir, "control"))


class MpsDaemon:
    """The MPS control daemon used by this engine; `started` says whether the engine must stop it."""

    def __init__(self, pipe_dir: str, log_dir: str | None, started: bool):
        self.pipe_dir, self.log_dir, self.started = pipe_dir, log_dir, started

    @classmethod
    def for_config(cls, config: EngineConfig, record: Callable[[str, str], None] = lambda pipe, log: None
                   ) -> "MpsDaemon | None":
        """The daemon the engine's workers join: the running one, or one started now. `record(pipe_dir, log_dir)` is
        called before a daemon is started (the engine's reaper stops it, should the owner die from then on)."""
        if config.mode != "rapid" or not uses_cuda(config):
            return None
        pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR)
        running = daemon_running(pipe_dir)
        if not config.rapid.use_mps:
            warnings.warn("mode 'rapid' without MPS: the workers only time-slice the GPU (no real "
                          "concurrency); results are not representative", RuntimeWarning, stacklevel=3)
            if running:  # a CUDA process joins the daemon it finds whatever the engine asks
                warnings.warn(f"use_mps=False, but an MPS daemon runs at {pipe_dir}: the workers will be its "
                              "clients anyway; stop it for a run without MPS", RuntimeWarning, stacklevel=3)
            return None
        if shutil.which("nvidia-cuda-mps-control") is None:
            raise RuntimeError(
                "mode 'rapid' on CUDA needs MPS but nvidia-cuda-mps-control is not on PATH; install the CUDA "
                "driver tools, or pass use_mps=False to run time-sliced (slower, with a warning)"
            )
        if running:
            logger.info("using the running MPS daemon (%s); it is left running at shutdown", pipe_dir)
            return cls(pipe_dir, None, started=False)
        pipe_dir = tempfile.mkdtemp(prefix="rapid-mps-pipe-")
        log_dir = tempfile.mkdtemp(prefix="rapid-mps-log-")
        daemon = cls(pipe_dir, log_dir, started=True)
        try:
            record(pipe_dir, log_dir)
            env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir, CUDA_MPS_LOG_DIRECTORY=log_dir)
            res = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, capture_output=True, text=True,
                                 timeout=30)
            if res.returncode != 0:
                raise RuntimeError(f"could not start the MPS daemon (exit {res.returncode}): {res.stderr.strip()}; "
                                   "pass use_mps=False to run time-sliced")
        except BaseException:  # a failed start, or a signal meanwhile: nothing of it stays behind
            daemon.stop()
            raise
        logger.info("started an MPS daemon (pipe %s, log %s)", pipe_dir, log_dir)
        return daemon

    def check_clients(self, pids: list[int]) -> None:
        """Fail if a worker runs outside MPS (a client that cannot reach the daemon runs alone, silently)."""
        servers = _control(self.pipe_dir, "get_server_list").split()
        clients: set[int] = set()
        for server in servers:
            out = _control(self.pipe_dir, f"get_client_list {server}")
            clients.update(int(tok) for tok in out.split() if tok.isdigit())
        missing = [pid for pid in pids if pid not in clients]
        if missing:
            raise RuntimeError(f"worker processes {missing} are not MPS clients of the daemon at {self.pipe_dir} "
                               f"(servers {servers}, clients {sorted(clients)}); concurrency would be time-sliced")
        logger.info("MPS: workers %s attached to server(s) %s", pids, servers)

    def stop(self) -> None:
        if not self.started:
            return
        daemons = _daemon_pids(self.pipe_dir)  # the control daemon and the server it started, for this pipe
        try:
            _control(self.pipe_dir, "quit")
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.warning("stopping the MPS daemon failed: %s", e)
        _wait_gone(daemons, timeout_s=10.0)
        for d in (self.pipe_dir, self.log_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        self.started = False


def _daemon_pids(pipe_dir: str) -> list[int]:
    """The MPS processes (control daemon, server) whose environment names this pipe directory."""
    pids = []
    needle = f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"nvidia-cuda-mps" not in f.read():
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait for the daemon's processes to exit after 'quit'; SIGKILL what is left at the deadline."""
    deadline = time.monotonic() + timeout_s
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if os.path.exists(f"/proc/{p}")]
        time.sleep(0.05)
    for pid in left:
        logger.warning("MPS process %d did not exit within %.0fs of 'quit': killing it", pid, timeout_s)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

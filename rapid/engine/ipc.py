"""ZeroMQ channels carrying msgspec messages, a private socket directory, and child-process plumbing."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)


def private_socket_dir() -> str:
    """A fresh 0700 directory for ipc:// endpoints (removed by its owner at shutdown)."""
    path = tempfile.mkdtemp(prefix="rapid-")
    os.chmod(path, 0o700)
    return path


def endpoint(directory: str, name: str) -> str:
    return f"ipc://{directory}/{name}.sock"


class Channel:
    """One ZMQ socket that sends/receives msgspec messages of a union type; malformed input is dropped."""

    def __init__(self, ctx: zmq.Context, kind: int, address: str, bind: bool, decode_type: Any = None):
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if bind:
            self.sock.bind(address)
        else:
            self.sock.connect(address)
        self.address = address
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(decode_type) if decode_type is not None else None

    def send(self, msg: Any) -> None:
        self.sock.send(self._encoder.encode(msg), copy=False)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def recv_nowait(self) -> Any | None:
        """The next well-formed message, or None when nothing is queued (bad messages are logged, skipped)."""
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                return self._decoder.decode(raw.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as e:
                logger.warning("dropped a malformed message on %s: %s", self.address, e)

    def recv(self, timeout_ms: int) -> Any | None:
        if self.poll(timeout_ms):
            return self.recv_nowait()
        return None

    def drain(self) -> list[Any]:
        out = []
        while (msg := self.recv_nowait()) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent exits (no orphaned workers)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        logger.debug("prctl unavailable: orphan protection relies on parent polling")


def setup_child_logging(log_path: str, name: str, level: int) -> None:
    logging.basicConfig(
        level=level, filename=log_path, filemode="a",
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s", force=True,
    )


def child_setup(env: dict[str, str], log_path: str, name: str, level: int) -> None:
    """First thing in every engine child: its environment (e.g. its MPS share), parent-death signal, log file."""
    import os

    os.environ.update(env)
    die_with_parent()
    setup_child_logging(log_path, name, level)


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def unlink_shm(name: str) -> None:
    """Remove a segment left by a process that died before it could (the supervisor's clean-up)."""
    path = f"/dev/shm/{name}"
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_no_expandable_segments() -> None:
    """CUDA IPC of the shared pool breaks with expandable segments: refuse them clearly."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:True" in conf.replace(" ", ""):
        raise ValueError(
            "PYTORCH_CUDA_ALLOC_CONF sets expandable_segments:True, which breaks CUDA IPC sharing of the "
            "weights and KV pool between rapid-mode workers; unset it or use mode='hybrid'"
        )

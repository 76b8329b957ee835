"""ZeroMQ channels carrying msgspec messages, a private socket directory, and child-process plumbing."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from rapid.engine.reaper import (  # noqa: F401 (shm_prefix, unlink_shm: re-exported for the engine's modules)
    CHILDREN_FILE,
    clean_engine_dir,
    process_start_time,
    same_process,
    shm_prefix,
    unlink_shm,
    unlink_shm_of,
)

logger = logging.getLogger(__name__)


SOCKET_DIR_PREFIX = "rapid-"
OWNER_FILE = "owner"  # "rapid-engine PID START PIDNS": marks the directory as an engine's, names its owner
OWNER_MARK = "rapid-engine"


def private_socket_dir() -> str:
    """A fresh 0700 directory for ipc:// endpoints and the children's logs, named and marked with its owner's
    pid (removed by its owner at shutdown; by the next engine start if the owner was killed)."""
    remove_stale_dirs()
    pid = os.getpid()
    path = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{pid}-")
    os.chmod(path, 0o700)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(f"{OWNER_MARK} {pid} {process_start_time(pid)} {_pid_namespace()}\n")
    return path


def _pid_namespace() -> str:
    """Pids mean something only within one pid namespace (containers may share a temp dir)."""
    try:
        return os.readlink("/proc/self/ns/pid").replace(" ", "")
    except OSError:
        return "-"


def record_child(directory: str, pid: int, role: str) -> None:
    """Note a child in its owner's directory, so that whoever cleans up after a killed owner finds it."""
    with open(os.path.join(directory, CHILDREN_FILE), "a") as f:
        f.write(f"{pid} {process_start_time(pid)} {role}\n")


def remove_stale_dirs(parent: str | None = None) -> list[str]:
    """Remove what engines whose owner process died left behind: only directories this user owns, marked as
    an engine's, whose owner pid is gone (or reused). Their recorded children still alive are killed and
    their /dev/shm segments unlinked. Returns the directories removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not re.fullmatch(rf"{SOCKET_DIR_PREFIX}\d+-\w+", name):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, OWNER_FILE)) as f:
                mark, pid, start, namespace = (f.read().split() + ["-"])[:4]
        except (OSError, ValueError):
            continue  # not an engine's directory (or not yet marked): leave it
        if mark != OWNER_MARK or namespace != _pid_namespace() or same_process(int(pid), start):
            continue  # not an engine's, another namespace's, or its owner lives
        killed = clean_engine_dir(path)
        if killed:
            logger.warning("killed processes %s, left running by dead engine owner %s", killed, pid)
        logger.info("removed %s, left by engine owner pid %s which is gone", path, pid)
        removed.append(path)
    return removed


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

    def send(self, msg: Any, check: Callable[[], None] | None = None, interval_ms: int = 100) -> None:
        """Queue `msg`; while the queue is full (the peer reads slowly, or is dead), wait. With `check`, call it
        between waits of `interval_ms`: it raises once waiting is pointless (the peer died)."""
        raw = self._encoder.encode(msg)
        if check is None:
            self.sock.send(raw, copy=False)
            return
        while True:
            try:
                self.sock.send(raw, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                check()
                self.sock.poll(interval_ms, zmq.POLLOUT)

    def try_send(self, msg: Any) -> bool:
        """Queue `msg` unless the queue is full; whether it was queued."""
        try:
            self.sock.send(self._encoder.encode(msg), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

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
    """Linux: have the kernel SIGKILL this process when the parent THREAD that started it exits. Only safe when
    that thread is the parent's main thread (the parent says so); watch_parent covers every case."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        logger.debug("prctl unavailable: orphan protection relies on the parent pipe")


def read_args(fd: int = 0) -> bytes:
    """A child's start-up arguments from fd (its stdin): an 8-byte length, then the msgspec bytes (the pipe
    stays open after them: see watch_parent). Raw reads: no buffered reader that a watching thread would hold
    at interpreter exit."""
    header = _read_exactly(fd, 8)
    raw = _read_exactly(fd, int.from_bytes(header, "little"))
    return raw


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise SystemExit("the parent process went away before sending all the start-up arguments")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def frame_args(raw: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw


def watch_parent(fd: int = 0) -> threading.Thread:
    """Die with the parent PROCESS: the parent holds the write end of fd (this child's stdin) open for the
    child's life; the kernel closes it when the parent process exits, however it exits (whichever of its threads
    started the child), and the read below returns EOF. Then this child unlinks its own /dev/shm segments and
    exits at once."""

    parent = os.getppid()

    def watch() -> None:
        while os.read(fd, 1):
            pass
        logger.error("the parent process (pid %d) is gone: exiting", parent)
        unlink_shm_of(os.getpid())
        logging.shutdown()
        os._exit(3)

    thread = threading.Thread(target=watch, name="rapid-parent-watch", daemon=True)
    thread.start()
    return thread


def setup_child_logging(log_path: str, name: str, level: int) -> None:
    logging.basicConfig(
        level=level, filename=log_path, filemode="a",
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s", force=True,
    )


def child_setup(log_path: str, name: str, level: int) -> None:
    """First thing in every engine child once its arguments are read: its log file. (Its environment, such as
    its MPS share, comes with the process, set before any import; the parent watch and the parent-death signal
    are set up by rapid.engine.child before the arguments are decoded.)"""
    setup_child_logging(log_path, name, level)


# ---------------------------------------------------------------------- SIGTERM during a start
class StartInterrupted(BaseException):
    """A signal (SIGTERM) arrived while the engine was starting: clean up, then let the signal act."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} during the engine start")
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise StartInterrupted(signum)


@contextlib.contextmanager
def start_interruptible(signums=(signal.SIGTERM, signal.SIGHUP)):
    """While starting, turn these signals into StartInterrupted (so the start's clean-up runs) where they would
    kill the process outright (default disposition, main thread only: Python runs handlers there)."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) is signal.SIG_DFL:
                installed[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def redeliver(exc: StartInterrupted) -> None:
    """After clean-up: let the signal do what it would have done (the default disposition: the process ends)."""
    logger.warning("signal %d arrived during the engine start: cleaned up, now acting on it", exc.signum)
    os.kill(os.getpid(), exc.signum)


CAUSE = re.compile(r" (ERROR|CRITICAL) |^Fatal Python error|^\w*(Error|Exception): ")


def tail(path: str, lines: int = 20) -> str:
    """The last lines of a child's log; when the last error line (a logged ERROR/CRITICAL, a traceback's last
    line, a fatal signal) is older than those, it comes first. Python's list of extension modules is left out."""
    try:
        with open(path, errors="replace") as f:
            text = [line for line in f.readlines() if not line.startswith("Extension modules:")]
    except OSError:
        return "(no log)"
    last = text[-lines:]
    causes = [line for line in text[:-lines] if CAUSE.search(line)] if len(text) > lines else []
    return "".join(([causes[-1], "...\n"] if causes else []) + last) or "(the log is empty)\n"


def check_no_expandable_segments() -> None:
    """CUDA IPC of the shared pool breaks with expandable segments: refuse them clearly."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:True" in conf.replace(" ", ""):
        raise ValueError(
            "PYTORCH_CUDA_ALLOC_CONF sets expandable_segments:True, which breaks CUDA IPC sharing of the "
            "weights and KV pool between rapid-mode workers; unset it or use mode='hybrid'"
        )


# A child's bad input (a model folder whose weights do not fit its config, say) is the user's error, raised in the
# owner as the same type that mode hybrid raises in-process, not as a process failure: the child writes it here.
CAUSE_ENV = "RAPID_CAUSE_FILE"
INPUT_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, NotImplementedError)}


class _Cause(msgspec.Struct):
    type: str
    message: str


def write_cause(path: str | None, error: Exception) -> None:
    """(In a child that fails.) Record an input error for the owner; other failures stay process failures."""
    name = type(error).__name__
    if path and name in INPUT_ERRORS:
        with contextlib.suppress(OSError):
            with open(path, "wb") as f:
                f.write(msgspec.json.encode(_Cause(name, str(error))))


def read_cause(path: str, where: str) -> Exception | None:
    """The input error a failed child recorded at `path`, as its own type, its message saying `where`; or None."""
    try:
        with open(path, "rb") as f:
            cause = msgspec.json.decode(f.read(), type=_Cause)
    except (OSError, msgspec.DecodeError):
        return None
    return INPUT_ERRORS[cause.type](f"{cause.message} ({where})") if cause.type in INPUT_ERRORS else None

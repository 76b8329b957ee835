"""The clean-up that a killed engine owner cannot do itself.

A multi-process engine's owner starts one reaper beside its children: a small process that holds the read end of a
pipe whose write end only the owner holds. When the owner exits, however it exits (SIGKILL included), the kernel
closes that end, the reaper's read returns, and it kills the children recorded in the engine's private directory
that still live, unlinks their /dev/shm segments, stops the MPS control daemon the engine started (when it started
one: none ran before), removes the socket and lock files of the ZeroMQ servers its owner bound at explicit ipc://
paths (recorded here: `record_endpoint`; only those whose lock no live process holds), and removes the directory. An
owner that shuts down cleanly has removed the directory already, and the reaper just exits.

Stdlib only: the reaper runs this file as a script (`python -I reaper.py DIR`), so it imports neither rapid nor
torch, and starts in some 20 ms. The engine's ipc module reuses the helpers below for its own clean-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref

CHILDREN_FILE = "children"  # one "PID START ROLE" line per child process the owner started
MPS_FILE = "mps"  # the pipe and log directories of the MPS control daemon the owner started, one a line
ENDPOINT_PREFIX = "endpoint-"  # one file per ZeroMQ server endpoint at an explicit ipc:// path (record_endpoint)
LOCK_WAIT_S = 0.5  # how long a lock may stay held after its owner died (the kernel closes its files as it exits)


def shm_prefix(pid: int) -> str:
    """The /dev/shm name prefix of the segments that process `pid` creates (rapid.worker.arena names them so)."""
    return f"rapid_{pid}_"


def process_start_time(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot; tells a pid from a reused one); None if it is
    gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def same_process(pid: int, start: str) -> bool:
    now = process_start_time(pid)
    return now is not None and str(now) == start


def recorded_children(directory: str) -> list[tuple[int, str]]:
    """(pid, start time) of every child recorded in an engine's directory."""
    try:
        with open(os.path.join(directory, CHILDREN_FILE)) as f:
            return [(int(line.split()[0]), line.split()[1]) for line in f if len(line.split()) >= 2]
    except (OSError, ValueError):
        return []


def unlink_shm(name: str) -> None:
    """Remove one /dev/shm segment by name (its memory stays mapped in the processes that map it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{name}")


def unlink_shm_of(pid: int) -> None:
    """Remove every /dev/shm segment that process `pid` created (it died before it could, or is exiting)."""
    prefix = shm_prefix(pid)
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        unlink_shm(name)


def record_private_mps(directory: str, pipe_dir: str, log_dir: str) -> None:
    """Note in an engine's directory the MPS control daemon its owner starts, for the reaper to stop (written whole
    or not at all: a reader never sees half a record)."""
    path = os.path.join(directory, MPS_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(f"{pipe_dir}\n{log_dir}\n")
    os.replace(path + ".tmp", path)


def quit_private_mps(directory: str, timeout_s: float = 10.0) -> str | None:
    """Send 'quit' to the MPS control daemon recorded in an engine's directory and remove its pipe and log
    directories; returns the pipe directory, None when none was recorded. (The daemon, once told, stops its server
    and exits; rapid.engine.mps waits for that on a clean shutdown, which a reaper has no reason to.)"""
    try:
        with open(os.path.join(directory, MPS_FILE)) as f:
            pipe_dir, log_dir = (f.read().splitlines() + ["", ""])[:2]
    except OSError:
        return None
    if not pipe_dir:
        return None
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, timeout=timeout_s,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for d in (pipe_dir, log_dir):
        if d:
            shutil.rmtree(d, ignore_errors=True)
    return pipe_dir


def record_endpoint(directory: str, socket_path: str, socket_id: tuple[int, int], lock_path: str,
                    lock_id: tuple[int, int]) -> str:
    """Note in an engine's directory a server socket its owner bound at an explicit ipc:// path and the lock file
    that guards it (each with its device and inode), for whoever cleans up after a killed owner (written whole or not
    at all). Returns the record's path: the owner removes it once it removed the files itself."""
    fd, tmp = tempfile.mkstemp(prefix="." + ENDPOINT_PREFIX, dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump({"socket": [socket_path, *socket_id], "lock": [lock_path, *lock_id]}, f)
    path = os.path.join(directory, os.path.basename(tmp)[1:])
    os.replace(tmp, path)
    return path


def _is_file(path: str, ident: list[int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return [st.st_dev, st.st_ino] == list(ident)


def _take_lock(fd: int, wait_s: float) -> bool:
    """An exclusive flock on `fd`, waiting up to `wait_s` for its holder to let go; False if it is still held."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:  # a live server's; or the dead owner's, its files being closed as it exits
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def remove_dead_endpoints(directory: str, lock_wait_s: float = LOCK_WAIT_S) -> list[str]:
    """Remove the socket and lock files recorded in an engine's directory whose lock no live process holds (a live
    server's, a successor's on the same path included, are left alone), if they are still the recorded files.
    Returns the socket paths removed."""
    removed = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(ENDPOINT_PREFIX))
    except OSError:
        return removed
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                record = json.load(f)
            (socket_path, *socket_id), (lock_path, *lock_id) = record["socket"], record["lock"]
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no lock file (its server removed it at exit), or not a record
        try:
            st = os.fstat(fd)
            if [st.st_dev, st.st_ino] == lock_id and _take_lock(fd, lock_wait_s) and _is_file(lock_path, lock_id):
                if _is_file(socket_path, socket_id):
                    os.unlink(socket_path)
                    removed.append(socket_path)
                os.unlink(lock_path)  # (a server that locks it after us finds it unlinked and makes a new one)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def clean_engine_dir(directory: str) -> list[int]:
    """Kill the recorded children of a dead owner that still live, unlink their segments, stop the MPS daemon it
    started, remove the directory. Returns the pids killed."""
    killed = []
    for pid, start in recorded_children(directory):
        if same_process(pid, start):
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:  # each child leads a group of its own: its helpers (inductor's) go too
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        unlink_shm_of(pid)
    quit_private_mps(directory)  # after its clients are gone
    remove_dead_endpoints(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return killed


def start(directory: str) -> subprocess.Popen:
    """Start the reaper of an engine's private directory. The caller owns the returned process: it keeps its
    stdin open for the engine's life, and `stop` ends it. A process forked from the owner closes its copy of that
    pipe at once, so the reaper still follows the owner alone (a fork pool's worker kept it waiting)."""
    reaper = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), directory], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, start_new_session=True)  # not in the owner's signal group
    # (one hook per engine started, never removed: a few hundred bytes each, and a no-op once the engine is gone)
    os.register_at_fork(after_in_child=functools.partial(_close_pipe, weakref.ref(reaper)))
    return reaper


def _close_pipe(reaper_ref: weakref.ref) -> None:
    """In a child forked from the owner: close the child's copy of the reaper's pipe."""
    reaper = reaper_ref()
    if reaper is not None and reaper.stdin is not None:
        with contextlib.suppress(OSError):
            reaper.stdin.close()


def stop(reaper: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """After the owner's own clean-up: close the pipe (the reaper finds the directory gone and exits) and reap."""
    with contextlib.suppress(OSError):
        reaper.stdin.close()
    try:
        reaper.wait(timeout_s)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


def main(directory: str) -> None:
    while os.read(0, 1 << 16):  # the owner never writes: this returns b"" once its end is closed
        pass
    if os.path.isdir(directory):
        killed = clean_engine_dir(directory)
        print(f"rapid reaper: engine owner gone; removed {directory}, killed {killed}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])

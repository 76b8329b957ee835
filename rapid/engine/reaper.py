"""The clean-up that a killed engine owner cannot do itself.

A multi-process engine's owner starts one reaper beside its children: a small process that holds the read end of a
pipe whose write end only the owner holds. When the owner exits, however it exits (SIGKILL included), the kernel
closes that end, the reaper's read returns, and it kills the children recorded in the engine's private directory
that still live, unlinks their /dev/shm segments, stops the MPS control daemon the engine started (when it started
one: none ran before) and removes the directory. An owner that shuts down cleanly has removed the directory already,
and the reaper just exits.

Stdlib only: the reaper runs this file as a script (`python -I reaper.py DIR`), so it imports neither rapid nor
torch, and starts in some 20 ms. The engine's ipc module reuses the helpers below for its own clean-up.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import weakref

CHILDREN_FILE = "children"  # one "PID START ROLE" line per child process the owner started
MPS_FILE = "mps"  # the pipe and log directories of the MPS control daemon the owner started, one a line


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

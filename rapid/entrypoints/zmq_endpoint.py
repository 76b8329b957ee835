"""Binding the server's socket: address checks, no stealing of a live ipc:// endpoint, cleanup of what it made.

An ipc:// endpoint is guarded by a lock file next to the socket (`<path>.lock`, flock held while the server
lives; the kernel releases it if the process dies). A second server on the same path fails with
AddressInUseError before it binds, so the first keeps its socket file. A socket file with no lock holder and no
listener (a server that was killed) is stale and replaced; one that accepts connections belongs to some other
program and is left alone (AddressInUseError). At exit a server removes the socket and lock files only if they
are still the ones it made (same device and inode). The private directory of a default address has a reaper
(rapid.engine.reaper): a server killed with SIGKILL leaves no directory or socket file behind either. An explicit
ipc:// path is recorded in the engine's private directory when the engine has one (`reaper_dir`: a multi-process
engine, e.g. `rapid serve`'s): the engine's reaper, which sees the server's process die, removes its socket and lock
files then, unless a live process holds the lock. With an in-process engine nothing outlives a SIGKILLed server:
the files stay until the next server on that path replaces them.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import socket
import stat

import zmq

from rapid.engine import ipc, reaper

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class AddressInUseError(OSError):
    """Another server (or program) listens on this address."""

    def __init__(self, message: str):
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return self.strerror


def check_address(address: str, allow_remote: bool = False) -> None:
    """ValueError unless `address` is ipc://..., or tcp:// on a loopback host (any host with allow_remote)."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str such as 'ipc:///path' or 'tcp://127.0.0.1:5555', got {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("ipc", "tcp"):
        raise ValueError(f"address {address!r}: use ipc://<path> or tcp://<host>:<port>")
    if scheme == "ipc":
        if not rest:
            raise ValueError("address 'ipc://' needs a path (or give no address for a private one)")
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port:
        raise ValueError(f"address {address!r}: tcp:// needs <host>:<port> (port '*' picks a free one)")
    if allow_remote or host in LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"address {address!r} is not a loopback address; the server has no authentication, so anyone who can "
        "reach it can use the model. Pass allow_remote=True (rapid serve --allow-remote) to bind it anyway (behind a "
        "firewall or tunnel)."
    )


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unlink_if(path: str, ident: tuple[int, int] | None) -> None:
    """Remove `path` only if it is still the file `ident` names."""
    if ident is not None and _file_id(path) == ident:
        try:
            os.unlink(path)
        except OSError as e:
            logger.debug("could not remove %s: %s", path, e)


def _lock(lock_path: str, address: str) -> int:
    """An fd holding an exclusive flock on lock_path (the file the path names now), or AddressInUseError."""
    for _ in range(5):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _held(fd, lock_path, address)
            os.close(fd)
            raise error from None
        st = os.fstat(fd)
        if _file_id(lock_path) == (st.st_dev, st.st_ino):  # not unlinked by its previous owner meanwhile
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)
    raise AddressInUseError(f"{address}: could not take {lock_path} (it keeps being replaced)")


def _held(fd: int, lock_path: str, address: str) -> AddressInUseError:
    """The error for a lock file (open at `fd`) another server holds; it names that server's pid."""
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    return AddressInUseError(f"{address} is in use: another RapidServer (pid {holder}) holds {lock_path}; stop it "
                             "or choose another address")


def _refuse_if_listened(path: str, address: str) -> None:
    """AddressInUseError when a program accepts connections on the socket file `path` (none there, or a stale one:
    nothing); ValueError when `path` is some other kind of file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{address}: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:  # ECONNREFUSED: nobody listens (a server that was killed); the file is stale
        return
    finally:
        probe.close()
    raise AddressInUseError(f"{address} is in use: a program listens on {path}; stop it or choose another address")


def _clear_stale_socket(path: str, address: str) -> None:
    _refuse_if_listened(path, address)
    if os.path.lexists(path):
        logger.info("replacing the stale socket file %s", path)
        os.unlink(path)


def check_ipc_free(address: str) -> None:
    """Before a slow start (rapid serve's engine): ValueError when an ipc:// address's folder is missing,
    AddressInUseError when another server holds its lock or a program listens on it. Binding checks again."""
    path = address.removeprefix("ipc://")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{address}: the folder {folder} does not exist; create it or choose another path")
    try:
        fd = os.open(path + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None  # no lock file: no server holds the path
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released at once by the close)
        except BlockingIOError:
            raise _held(fd, path + ".lock", address) from None
        finally:
            os.close(fd)
    _refuse_if_listened(path, address)


def reaper_dir_of(llm) -> str | None:
    """The private directory of `llm`'s engine whose reaper outlives the process (None: an in-process engine)."""
    return getattr(getattr(llm, "engine", None), "reaper_dir", None)


class Endpoint:
    """Where a server's ROUTER is bound and what it must remove at exit (lock, socket file, private directory).
    `reaper_dir`: an engine directory whose reaper removes an explicit ipc:// path's files if this process is killed."""

    def __init__(self, sock: zmq.Socket, address: str | None, allow_remote: bool = False,
                 reaper_dir: str | None = None):
        self._record: str | None = None  # this endpoint's record in reaper_dir
        self._dir: str | None = None
        self._lock_fd: int | None = None
        self._lock_path = ""
        self._lock_id: tuple[int, int] | None = None
        self._socket_path = ""
        self._socket_id: tuple[int, int] | None = None
        self._reaper = None
        if address is None:
            self._dir = ipc.private_socket_dir()
            self._reaper = reaper.start(self._dir)  # removes the directory if this process is killed
            address = ipc.endpoint(self._dir, "server")
        else:
            check_address(address, allow_remote)
        try:
            self.address = self._bind(sock, address)
        except BaseException:
            self.release()
            raise
        if reaper_dir is not None and self._socket_id is not None and self._lock_id is not None:
            try:
                self._record = reaper.record_endpoint(reaper_dir, self._socket_path, self._socket_id, self._lock_path,
                                                      self._lock_id)
            except OSError as e:  # the engine is gone (shut down): nothing outlives this process to clean up
                logger.debug("could not record %s in %s: %s", self.address, reaper_dir, e)

    def _bind(self, sock: zmq.Socket, address: str) -> str:
        if address.startswith("ipc://"):
            path = address.removeprefix("ipc://")
            self._lock_path = path + ".lock"
            self._lock_fd = _lock(self._lock_path, address)
            st = os.fstat(self._lock_fd)
            self._lock_id = (st.st_dev, st.st_ino)
            _clear_stale_socket(path, address)
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUseError(f"{address} is in use by another program; choose another address") from None
            raise ValueError(f"cannot bind {address}: {e}") from None
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # tcp port '*' resolved
        if bound.startswith("ipc://"):
            self._socket_path = bound.removeprefix("ipc://")
            self._socket_id = _file_id(self._socket_path)
        return bound

    def release(self) -> None:
        """Remove the socket file and lock file if still ours, release the lock, remove the private directory.
        Call after the socket is closed. Idempotent."""
        if self._socket_path:
            _unlink_if(self._socket_path, self._socket_id)
            self._socket_path = ""
        if self._lock_fd is not None:
            _unlink_if(self._lock_path, self._lock_id)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._record is not None:  # (after its files: a record outliving them is harmless, not the reverse)
            try:
                os.unlink(self._record)
            except OSError:  # the engine's directory went first
                pass
            self._record = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._reaper is not None:
            reaper.stop(self._reaper)  # the directory is gone: it exits at once
            self._reaper = None

"""One allocation (weights + KV pool) that an owner process creates and other processes may map.

CPU: a POSIX shared-memory segment (/dev/shm/rapid_{owner pid}_..., opened by name and mapped with
mmap; not multiprocessing.shared_memory, whose resource tracker process would outlive a killed worker
and end its log with a leak warning instead of the cause). The name lives only through the start: once every
process has mapped it the supervisor unlinks it (rapid.engine.processes), and the memory goes with the last mapping,
however its processes end. CUDA: one device allocation exported
with a CUDA IPC handle. Either way only an `ArenaHandle` (a msgspec Struct: names, bytes, ints)
crosses the process boundary, and both sides compute the same layout of tensors inside the arena
from the config, so nothing but the handle is sent. The owner must outlive every importer.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import uuid
from dataclasses import dataclass

import torch

from rapid.engine.ipc import shm_prefix
from rapid.protocol.worker import ArenaHandle

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes; keeps every tensor aligned for vectorised loads


@dataclass(frozen=True)
class Slot:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def plan_layout(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[dict[str, Slot], int]:
    """Byte offsets of named tensors packed one after another (aligned); returns (slots, total bytes)."""
    slots, offset = {}, 0
    for name, shape, dtype in entries:
        offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        slots[name] = Slot(offset, tuple(shape), dtype)
        offset += math.prod(shape) * dtype.itemsize
    return slots, max(offset, 1)


class SharedArena:
    """A byte buffer shared between processes; `view` carves typed tensors out of it."""

    def __init__(self, buffer: torch.Tensor, handle: ArenaHandle, owner: bool, shm=None, storage=None):
        self.buffer = buffer  # [nbytes] uint8
        self.handle = handle
        self.owner = owner
        self._shm = shm
        self._storage = storage
        self._closed = False

    @classmethod
    def create(cls, nbytes: int, device: torch.device, shared: bool = True) -> "SharedArena":
        """A new arena; shared=False: private memory of this process (mode 'hybrid': nothing maps it)."""
        if not shared:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            return cls(buffer, ArenaHandle("local", nbytes), owner=True)
        if device.type == "cpu":
            name = f"{shm_prefix(os.getpid())}{uuid.uuid4().hex[:8]}"
            shm = ShmSegment(name, nbytes, create=True)
            buffer = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
            return cls(buffer, ArenaHandle("shm", nbytes, shm_name=name), owner=True, shm=shm)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        args = buffer.untyped_storage()._share_cuda_()
        return cls(buffer, ArenaHandle("cuda", nbytes, cuda_args=list(args)), owner=True)

    @classmethod
    def open(cls, handle: ArenaHandle, device: torch.device) -> "SharedArena":
        if handle.kind == "shm":
            try:
                shm = ShmSegment(handle.shm_name, handle.nbytes, create=False)
            except FileNotFoundError as e:
                raise RuntimeError(f"shared memory {handle.shm_name} is gone: its owner process exited, or the "
                                   "engine's start had ended (the name lives until every process mapped it)") from e
            buffer = torch.frombuffer(shm.buf, dtype=torch.uint8, count=handle.nbytes)
            return cls(buffer, handle, owner=False, shm=shm)
        if handle.kind != "cuda":
            raise ValueError(f"unknown arena kind {handle.kind!r}")
        args = list(handle.cuda_args)
        torch.cuda.set_device(device)  # the raw IPC import does not initialise CUDA itself (segfaults if not)
        storage = torch.UntypedStorage._new_shared_cuda(*args)
        buffer = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (handle.nbytes,), (1,))
        return cls(buffer, handle, owner=False, storage=storage)

    def view(self, slot: Slot) -> torch.Tensor:
        nbytes = math.prod(slot.shape) * slot.dtype.itemsize
        return self.buffer[slot.offset : slot.offset + nbytes].view(slot.dtype).view(slot.shape)

    def close(self) -> None:
        """Drop this process's mapping; the owner also unlinks the segment / frees the memory."""
        if self._closed:
            return
        self._closed = True
        self.buffer = None
        self._storage = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:
                logger.debug("shared memory %s still has exported views; unmapped at exit", self.handle.shm_name)
            if self.owner:
                self._shm.unlink()


class ShmSegment:
    """A named POSIX shared-memory segment mapped into this process (no resource tracker: see the module doc)."""

    def __init__(self, name: str, nbytes: int, create: bool):
        self.name = name
        self.path = f"/dev/shm/{name}"
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self._mmap = mmap.mmap(fd, nbytes)
        except BaseException:
            if create:
                self.unlink()
            raise
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap; BufferError while tensors still view it (then the mapping goes at process exit)."""
        self.buf.release()
        self._mmap.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

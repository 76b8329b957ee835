"""Freeze the start-up heap out of Python's garbage collector once a process is ready to serve.

A full (generation 2) collection traverses every object the collector tracks. After start-up most of them are
what importing torch, loading, compiling and capturing left behind: about 300,000 objects with the tiny CPU model,
where one full collection took 216 ms in the middle of an offline run and stalled the step loop (the device idles
meanwhile). gc.freeze() moves them to a permanent generation that collections skip, as vLLM does once its server
has started (vllm.utils.gc_utils.freeze_gc_heap). Objects freed by reference counting still go at once; only
reference cycles among the frozen objects would stay.

So it is done only in processes rapid owns: the engine's child processes (freeze_startup_heap once they are ready)
and rapid's own commands that hold an in-process engine (`startup_heap_frozen` around it: thawed when the block
ends, so the closed engine's cycles can be collected before the next engine starts). `LLM` in a user's process
never freezes: that would keep the user's own cycles (and an engine they hold) alive, and thaw what they froze.
"""

from __future__ import annotations

import contextlib
import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> None:
    """Collect what start-up left as garbage, then freeze the rest out of later collections."""
    gc.collect()
    gc.freeze()
    logger.debug("%s: %d start-up objects frozen out of garbage collection", process, gc.get_freeze_count())


@contextlib.contextmanager
def startup_heap_frozen(process: str):
    """freeze_startup_heap for the block (a rapid command that holds an in-process engine), thawed at its end."""
    freeze_startup_heap(process)
    try:
        yield
    finally:
        gc.unfreeze()

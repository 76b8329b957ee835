"""Freeze the start-up heap out of Python's garbage collector once a process is ready to serve.

A full (generation 2) collection traverses every object the collector tracks. After start-up most of them are
what importing torch, loading, compiling and capturing left behind: about 300,000 objects with the tiny CPU model,
where one full collection took 216 ms in the middle of an offline run and stalled the step loop (the device idles
meanwhile). gc.freeze() moves them to a permanent generation that collections skip, as vLLM does once its server
has started (vllm.utils.gc_utils.freeze_gc_heap). Objects freed by reference counting still go at once; only
reference cycles among the frozen objects would stay.

Freezing is not enough under load. On the H200 (`bench/gc_probe.py`, hybrid offline, 512 requests of 1000 in /
1000 out, Python 3.12) a full collection still ran every 2.4-3.1 s (every ~133 decode steps: the default thresholds
700, 10, 10 count allocations) and took 80-350 ms: it traverses what the run holds, chiefly the token lists of the
live requests (a list's traversal visits every element). The device idled 80-114 ms at each, 1.0 of the run's 56 s.
So these processes also raise the oldest generation's threshold to FULL_COLLECTION_THRESHOLD (CPython's default is
10): full collections run 10x less often. The younger generations' thresholds are kept as the interpreter has them,
so short-lived cycles still go as soon as before; only cycles that outlived two younger collections wait longer, as
SGLang's --gc-threshold and ROCm ATOM's engine processes allow. (Python 3.14's incremental collector ignores the
third threshold: there this part does nothing.)

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


FULL_COLLECTION_THRESHOLD = 100  # a full collection after 100 (CPython's default: 10) collections of generation 1


def freeze_startup_heap(process: str) -> None:
    """Collect what start-up left as garbage, freeze the rest out of later collections, and make full collections
    rarer (FULL_COLLECTION_THRESHOLD; the younger generations' thresholds unchanged)."""
    gc.collect()
    gc.freeze()
    young, middle, oldest = gc.get_threshold()
    gc.set_threshold(young, middle, max(oldest, FULL_COLLECTION_THRESHOLD))
    logger.debug("%s: %d start-up objects frozen out of garbage collection, thresholds %s", process,
                 gc.get_freeze_count(), gc.get_threshold())


@contextlib.contextmanager
def startup_heap_frozen(process: str):
    """freeze_startup_heap for the block (a rapid command that holds an in-process engine), thawed and the
    thresholds restored at its end."""
    thresholds = gc.get_threshold()
    freeze_startup_heap(process)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)

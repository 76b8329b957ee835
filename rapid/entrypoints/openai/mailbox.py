"""Deltas from the engine thread to the HTTP server's event loop, one wake-up per burst.

The frontend thread delivers every request's deltas after each engine step. Waking the event loop once per delta
(`call_soon_threadsafe` writes to the loop's self-pipe each time) costs a system call and a loop turn per token:
at 8k tokens/s that is most of a core. Here the thread appends to a deque and wakes the loop only when no wake-up is
already pending; the loop then hands everything that arrived to the requests' queues in one turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Callable

logger = logging.getLogger(__name__)


class LoopMailbox:
    """Thread-safe `post(fn, arg)`: `fn(arg)` runs on `loop`, in posting order, batched per wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: deque[tuple[Callable, object]] = deque()
        self._wake_pending = False

    def post(self, fn: Callable, arg) -> None:
        """From any thread. A closed loop drops the item (its request is being torn down anyway)."""
        with self._lock:
            self._items.append((fn, arg))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nothing will ever run them
            with self._lock:
                self._items.clear()
                self._wake_pending = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._wake_pending = False
        for fn, arg in items:
            try:
                fn(arg)
            except Exception:  # one request's failure must not lose the others' deltas
                logger.exception("delivering a delta to its request failed")

"""DeltaRouter: LLM.generate and generate_stream on one engine, from several threads or streams at once.

The engine hands every request's output to whoever asks (EngineClient.get_deltas), and its clients are not
thread-safe (a ZeroMQ socket; the in-process scheduler). The router runs every engine call under one lock and files
each delta in the inbox of the caller that owns its request, whichever caller polled: two threads, or two streams
read in turn by one thread, each get exactly their own requests' deltas (they used to drop each other's and hang).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rapid.protocol.engine import RequestDelta

POLL_S = 0.05  # the longest one poll holds the engine (waiting for output across processes), or a caller waits


class DeltaRouter:
    def __init__(self, engine):
        self.engine = engine
        self._engine_lock = threading.Lock()  # one engine call at a time
        self._filed = threading.Condition()  # guards _inboxes and what they hold; notified after every poll
        self._inboxes: dict[str, deque[RequestDelta]] = {}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An engine call other than polling (add_request, abort), between polls."""
        with self._engine_lock:
            return fn(*args)

    def open(self, request_ids: Iterable[str]) -> deque[RequestDelta]:
        """One inbox for these requests' deltas, opened before they reach the engine."""
        inbox: deque[RequestDelta] = deque()
        with self._filed:
            for rid in request_ids:
                self._inboxes[rid] = inbox
        return inbox

    def close(self, request_ids: Iterable[str]) -> None:
        """Stop filing these requests' deltas: later ones (an aborted request's last) are dropped."""
        with self._filed:
            for rid in request_ids:
                self._inboxes.pop(rid, None)

    def take(self, inbox: deque[RequestDelta]) -> list[RequestDelta]:
        """What `inbox` holds, in arrival order; when it is empty, poll the engine (or wait while another does)."""
        while True:
            with self._filed:
                if inbox:
                    out = list(inbox)
                    inbox.clear()
                    return out
            if self._engine_lock.acquire(blocking=False):
                try:
                    deltas = self.engine.get_deltas(timeout_s=POLL_S)
                finally:
                    self._engine_lock.release()
                with self._filed:
                    for d in deltas:
                        owner = self._inboxes.get(d.request_id)
                        if owner is not None:
                            owner.append(d)
                    self._filed.notify_all()
            else:
                with self._filed:
                    if not inbox:
                        self._filed.wait(POLL_S)

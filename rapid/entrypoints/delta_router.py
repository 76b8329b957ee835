"""DeltaRouter: LLM.generate and generate_stream on one engine, from several threads or streams at once.

The engine hands every request's output to whoever asks (EngineClient.get_deltas), and its clients are not
thread-safe (a ZeroMQ socket; the in-process scheduler). The router runs every engine call under one lock and files
each delta in the inbox of the caller that owns its request, whichever caller polled: two threads, or two streams
read in turn by one thread, each get exactly their own requests' deltas (they used to drop each other's and hang).

Aborts may come from anywhere, also from a stream's `finally` that the garbage collector runs in the middle of a
poll of the same thread: an abort from inside one of the router's own sections is queued and sent at the next
engine call, any other is sent at once. Every lock is taken with `with` on a C lock, which an interrupt (Ctrl-C)
cannot cut between taking and entering, so none is left held; a caller whose deltas another's poll filed finds them
once it gets the engine lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rapid.protocol.engine import RequestDelta

POLL_S = 0.05  # the longest one poll holds the engine (waiting for output across processes)


class DeltaRouter:
    def __init__(self, engine):
        self.engine = engine
        self._engine_lock = threading.Lock()  # one engine call at a time
        self._filed = threading.RLock()  # guards _inboxes, what they hold and _aborts
        self._inboxes: dict[str, deque[RequestDelta]] = {}
        self._aborts: list[str] = []  # request ids to abort at the next engine call
        self._held = threading.local()  # .depth > 0: this thread is inside a section that holds a lock here

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An engine call other than polling (add_request), between polls."""
        self._enter()
        try:
            with self._engine_lock:
                self._send_aborts()
                return fn(*args)
        finally:
            self._leave()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Abort these requests: now, or, when this thread is inside one of the router's sections (a collector
        run in the middle of its poll), at the next engine call."""
        self._enter()
        try:
            with self._filed:
                self._aborts.extend(request_ids)
        finally:
            self._leave()
        if getattr(self._held, "depth", 0) == 0:
            self.call(lambda: None)  # sends the queued aborts

    def open(self, request_ids: Iterable[str]) -> deque[RequestDelta]:
        """One inbox for these requests' deltas, opened before they reach the engine."""
        inbox: deque[RequestDelta] = deque()
        self._enter()
        try:
            with self._filed:
                for rid in request_ids:
                    self._inboxes[rid] = inbox
        finally:
            self._leave()
        return inbox

    def close(self, request_ids: Iterable[str]) -> None:
        """Stop filing these requests' deltas: later ones (an aborted request's last) are dropped."""
        self._enter()
        try:
            with self._filed:
                for rid in request_ids:
                    self._inboxes.pop(rid, None)
        finally:
            self._leave()

    def take(self, inbox: deque[RequestDelta]) -> list[RequestDelta]:
        """What `inbox` holds, in arrival order; when it is empty, poll the engine, after waiting for the poll of
        another caller (which may have filed what this one waits for)."""
        while True:
            self._enter()
            try:
                with self._filed:
                    if inbox:
                        out = list(inbox)
                        inbox.clear()
                        return out
                with self._engine_lock:
                    if inbox:  # filed by the poll this caller waited for
                        continue
                    deltas: list[RequestDelta] = []
                    try:
                        self._send_aborts()
                        deltas = self.engine.get_deltas(timeout_s=POLL_S)
                        self._send_aborts()  # those queued during the poll
                    finally:
                        self._file(deltas)
            finally:
                self._leave()

    def _enter(self) -> None:
        self._held.depth = getattr(self._held, "depth", 0) + 1

    def _leave(self) -> None:
        self._held.depth -= 1

    def _send_aborts(self) -> None:
        """(Under _engine_lock.) The queued aborts, to the engine."""
        with self._filed:
            ids, self._aborts = self._aborts, []
        if ids:
            self.engine.abort(ids)

    def _file(self, deltas: list[RequestDelta]) -> None:
        with self._filed:
            for d in deltas:
                owner = self._inboxes.get(d.request_id)
                if owner is not None:
                    owner.append(d)

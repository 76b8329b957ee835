"""Waker: a pipe another thread writes a byte to so that a thread sleeping in zmq poll wakes up.

The engine loop calls wake() when it has queued deltas for the ZeroMQ server; the server's socket thread polls
`fd` together with its socket and drain()s it. wake() never blocks and is a no-op after close().
"""

from __future__ import annotations

import os
import threading


class Waker:
    """A pipe the engine loop writes a byte to when deltas are queued; the socket thread polls its read end."""

    def __init__(self):
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._w, b"\0")
                except BlockingIOError:  # full: the reader has plenty to wake it
                    pass

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._w)
                os.close(self.fd)

"""HttpServer: uvicorn serving an app in a background thread of this process (start, stop)."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

logger = logging.getLogger(__name__)


class HttpServer:
    """`app` on host:port (port 0 picks a free one; `port` is the bound one after start())."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, *, graceful_timeout_s: float = 5.0):
        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=graceful_timeout_s)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "HttpServer":
        """Serve in a daemon thread; returns once the socket listens (OSError if it could not bind)."""
        self._thread = threading.Thread(target=self.server.run, name="rapid-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server could not listen on {self.host}:{self.port} (in use? see the log); "
                              "choose another --port, or --no-http")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening, let open responses end (bounded by graceful_timeout_s) and join the thread."""
        self.server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the HTTP server did not stop within %.0fs", timeout_s)

"""EngineFrontend: one engine shared by several servers (ZeroMQ, HTTP) from any thread.

One thread, the engine loop, owns `llm.engine`; other threads only enqueue commands. Each request
carries a callback that the engine loop calls with every RequestDelta of that request (the last has
finished=True, or error set); callbacks must not block (hand the delta to your own thread or event loop:
`loop.call_soon_threadsafe(queue.put_nowait, delta)` for asyncio). The loop also checks the engine's
health while idle, so a dead worker is noticed without waiting for a request. Observers (a server's metrics:
`observe_requests`) follow every request, whichever server submitted it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from rapid.engine.client import EngineDeadError
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest, RequestDelta

logger = logging.getLogger(__name__)

DeltaCallback = Callable[[RequestDelta], None]


class RequestObserver(Protocol):
    """Follows one request (e.g. openai.metrics.RequestTracker): every delta, on the engine loop's thread."""

    def on_delta(self, delta: RequestDelta) -> None: ...


# called as the request reaches the engine with its prompt length and the SamplingParams it runs with
ObserverFactory = Callable[[int, SamplingParams], RequestObserver]

IDLE_WAIT_S = 0.05  # how long the idle loop sleeps between health checks and command polls
BUSY_WAIT_S = 0.005  # with requests in flight, the longest a new command waits while no output comes
HEALTH_EVERY_S = 0.5


class OverloadedError(RuntimeError):
    """More requests are waiting than the frontend admits (answer 429 / 503 and let the client retry)."""


class NeverFitsError(ValueError):
    """One submission holds more requests than the frontend ever admits at once: no retry can succeed (a 400)."""


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    on_delta: DeltaCallback
    arrival_time: float


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Live:
    """A request in the engine: its consumer, and the observers that see each delta first."""

    on_delta: DeltaCallback
    observers: list[RequestObserver]


@dataclass
class _GetStats:
    answer: Future  # set by the engine loop with the engine's Stats (or its error)


class EngineFrontend:
    """Serve `llm` (an entrypoints.llm.LLM) to several threads; `max_pending` bounds the requests in flight."""

    def __init__(self, llm, max_pending: int = 4096):
        self.llm = llm
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # the requests in the engine, by id; owned by the engine loop
        self._observer_factories: tuple[ObserverFactory, ...] = ()
        self._num_pending = 0  # requests submitted and not finished (read from any thread: a snapshot)
        self._count_lock = threading.Lock()  # also orders submit against close (no command queued after it)
        self._closed = False  # set under _count_lock once the engine loop takes no more commands
        self._stop = threading.Event()
        self.dead_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="rapid-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    @property
    def num_pending(self) -> int:
        return self._num_pending

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, on_delta: DeltaCallback,
               prompt: str | None = None) -> None:
        """Queue a validated request (see LLM.validate); its deltas go to `on_delta` on the engine loop's thread."""
        self.submit_all([(request_id, prompt_token_ids, params, on_delta, prompt)])

    def submit_all(self, requests: list[tuple[str, list[int], SamplingParams, DeltaCallback, str | None]]) -> None:
        """Queue several validated requests, (request_id, prompt_token_ids, params, on_delta, prompt) each, all or
        none: OverloadedError, NeverFitsError (or EngineDeadError) queues none of them, so a refused HTTP request
        with n choices leaves nothing in the engine or in the metrics."""
        self.check_health()
        with self._count_lock:
            if self._closed or self._stop.is_set():
                raise EngineDeadError("the frontend is closed")
            self.check_room(len(requests))
            self._num_pending += len(requests)
            now = time.time()
            for request_id, prompt_token_ids, params, on_delta, prompt in requests:
                self._commands.put(_Submit(request_id, list(prompt_token_ids), params, prompt, on_delta, now))

    def check_room(self, count: int) -> None:
        """OverloadedError unless `count` more requests fit beside those in flight, NeverFitsError when they would not
        fit even alone (submit_all's own check; a server may ask first, before it tokenizes them)."""
        if count > self.max_pending:
            raise NeverFitsError(f"these are {count} requests (prompts x n), more than this server holds at once "
                                 f"(--max-pending {self.max_pending}); send fewer at a time")
        if self._num_pending + count > self.max_pending:
            more = f" and these add {count}" if count > 1 else ""
            raise OverloadedError(f"{self._num_pending} requests are in flight{more} (the limit is "
                                  f"{self.max_pending}); retry later")

    def observe_requests(self, factory: ObserverFactory) -> Callable[[], None]:
        """Follow every request that reaches the engine from now on, by any server: `factory(num_prompt_tokens,
        params)` makes its observer then, which sees each of its deltas before the request's own callback (and
        those that only say it was scheduled, RequestDelta.is_empty, which the callback does not get). Returns the
        function that stops it (a factory given twice counts once)."""
        if factory not in self._observer_factories:
            self._observer_factories = (*self._observer_factories, factory)

        def stop() -> None:
            self._observer_factories = tuple(f for f in self._observer_factories if f != factory)

        return stop

    def abort(self, request_ids: list[str]) -> None:
        """End these requests; each still gets its final delta (finish_reason 'abort')."""
        self._commands.put(_Abort(list(request_ids)))

    def get_stats(self, timeout_s: float = 5.0):
        """The engine's Stats (KV usage, preemptions, timings), asked of the engine loop; TimeoutError if it
        does not answer in time."""
        self.check_health()
        answer: Future = Future()
        self._commands.put(_GetStats(answer))
        return answer.result(timeout=timeout_s)

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def close(self) -> None:
        """Stop the engine loop (in-flight requests end with an error delta); the LLM is the caller's to shut down."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    # ------------------------------------------------------------------ the engine loop
    def _finish(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        with self._count_lock:
            self._num_pending -= 1

    def _deliver(self, delta: RequestDelta) -> None:
        live = self._live.get(delta.request_id)
        if live is None:
            return
        for observer in live.observers:
            try:
                observer.on_delta(delta)
            except Exception:  # a broken observer must not stop the loop
                logger.exception("request observer for %s failed", delta.request_id)
        if delta.finished or delta.error is not None:
            self._finish(delta.request_id)
        elif delta.is_empty:  # it only says the request was scheduled: news for the observers, not the consumer
            return
        try:
            live.on_delta(delta)
        except Exception:  # a broken consumer must not stop the loop
            logger.exception("delta callback for %s failed", delta.request_id)

    def _fail_all(self, reason: str) -> None:
        for rid in list(self._live):
            self._deliver(RequestDelta(rid, [], "", finished=True, finish_reason="abort", error=reason))

    def _refuse(self, cmd: _Submit, error: str) -> None:
        """End a submitted request that never reached the engine."""
        with self._count_lock:
            self._num_pending -= 1
        try:
            cmd.on_delta(RequestDelta(cmd.request_id, [], "", finished=True, finish_reason="abort", error=error))
        except Exception:  # a broken consumer must not stop the loop
            logger.exception("delta callback for %s failed", cmd.request_id)

    def _apply(self, cmd) -> None:
        engine = self.llm.engine
        if isinstance(cmd, _GetStats):
            try:
                cmd.answer.set_result(engine.get_stats())
            except Exception as e:
                cmd.answer.set_exception(e)
            return
        if isinstance(cmd, _Abort):
            engine.abort([rid for rid in cmd.request_ids if rid in self._live])
            return
        if cmd.request_id in self._live:  # the first request keeps its callback
            self._refuse(cmd, f"request id {cmd.request_id!r} is already in use")
            return
        self._live[cmd.request_id] = _Live(cmd.on_delta, self._make_observers(len(cmd.prompt_token_ids), cmd.params))
        try:
            engine.add_request(AddRequest(cmd.request_id, cmd.prompt_token_ids, cmd.params, prompt=cmd.prompt,
                                          arrival_time=cmd.arrival_time))
        except Exception as e:  # refused (ValueError) or the engine is dead
            self._deliver(RequestDelta(cmd.request_id, [], "", finished=True, finish_reason="abort", error=str(e)))

    def _make_observers(self, num_prompt_tokens: int, params: SamplingParams) -> list[RequestObserver]:
        observers = []
        for make in self._observer_factories:
            try:
                observers.append(make(num_prompt_tokens, params))
            except Exception:  # a broken observer must not stop the loop
                logger.exception("a request observer could not be made")
        return observers

    def _run(self) -> None:
        last_health = 0.0
        while not self._stop.is_set():
            try:
                self._turn()
                if not self._live and time.monotonic() - last_health > HEALTH_EVERY_S:
                    last_health = time.monotonic()
                    self.llm.engine.check_health()
                    self.dead_reason = None  # healthy (again, if the engine restarted its processes)
            except Exception as e:  # EngineDeadError, or a bug: fail what is in flight, keep answering
                reason = str(e) if isinstance(e, EngineDeadError) else f"{type(e).__name__}: {e}"
                if self.dead_reason != reason:
                    logger.error("engine failed: %s", reason)
                self.dead_reason = reason
                if not isinstance(e, EngineDeadError) and self._live:
                    try:  # a live engine must not go on working for requests nobody will read
                        self.llm.engine.abort(list(self._live))
                    except Exception:
                        logger.exception("aborting the failed requests failed")
                self._fail_all(f"engine error: {reason}")
                self._stop.wait(IDLE_WAIT_S)
        self._shutdown_requests()

    def _turn(self) -> None:
        """Apply the queued commands (waiting a little when idle), then one engine step if anything runs."""
        try:
            cmd = self._commands.get_nowait() if self._live else self._commands.get(timeout=IDLE_WAIT_S)
        except queue.Empty:
            cmd = None
        while cmd is not None:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None
        if self._live:
            for delta in self.llm.engine.get_deltas(timeout_s=BUSY_WAIT_S):
                self._deliver(delta)

    def _shutdown_requests(self) -> None:
        """On close: end the requests still queued, abort what is in flight, give the engine a moment to
        confirm, then fail the rest."""
        with self._count_lock:
            self._closed = True
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Submit):  # never sent to the engine
                self._refuse(cmd, "the server is shutting down")
            elif isinstance(cmd, _GetStats):
                cmd.answer.set_exception(EngineDeadError("the frontend is closed"))
        if not self._live:
            return
        try:
            self.llm.engine.abort(list(self._live))
            deadline = time.monotonic() + 5.0
            while self._live and time.monotonic() < deadline:
                for delta in self.llm.engine.get_deltas(timeout_s=0.1):
                    self._deliver(delta)
        except Exception as e:
            logger.warning("aborting in-flight requests at close failed: %s", e)
        self._fail_all("the server is shutting down")

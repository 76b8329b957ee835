"""RapidServer: an LLM behind a ZeroMQ ROUTER socket, for rapid.client.Client / AsyncClient.

Wire format: rapid.protocol.api (one msgpack frame per message; the ROUTER adds the peer's identity frame).
A client (a DEALER socket) sends GenerateRequest / ChatRequest / CancelRequest with ids of its own choosing;
the server answers each request with Delta messages (stream=True, the last finished=True) or one Completion, or
with an ErrorReply. An empty frame from the server is a liveness probe (clients ignore it).

Threads: the engine belongs to an EngineFrontend (its engine loop thread; given, and then shared with e.g. the
HTTP server, or made and owned here). The socket thread (`serve_forever`, or `start()` for a background thread)
owns the ZeroMQ socket and every per-client structure: it reads messages, admits requests to the frontend and
sends replies. Deltas come from the engine loop through a callback that only puts them on a queue and writes a
byte to a pipe the socket thread polls with the socket, so the engine never waits for a client.

Bounds (rapid.entrypoints.zmq_limits.ServerLimits, defaults; table in docs/reliability.md): frames over 4 MiB get
an ErrorReply without being decoded, over 16 MiB ZeroMQ drops the connection; text over max_model_len x 32
characters and token lists over max_model_len are refused before tokenization; chats of at most 1024 messages;
per client at most 64 requests in the engine, 1024 (16 MiB) waiting, admitted round-robin across clients;
64 MiB waiting in total; replies ZeroMQ cannot take (its pipe holds 256 per client) wait in an outbox of at
most 8 MiB per client (256 MiB in total) and for at most 30 s without progress, after which the client is
dropped (requests aborted, memory freed, later messages on that connection refused).

Clients that go away: a reply to a vanished peer fails (ROUTER_MANDATORY) and aborts its requests; so that
non-streamed requests notice too, every disconnect seen by a socket monitor (ZMTP heartbeats every 2 s turn a
dead host into a disconnect within 10 s) starts a second of probes (empty frames) to peers with requests.

Engine request ids are "<server prefix>-<counter>", never shown to clients, so a client may reuse its id as soon
as it has cancelled the request (the old one's remaining replies are then dropped). A dead engine is noticed
while idle (the frontend checks its health), logged, and new requests get "engine error: ...".

There is no authentication, so the default endpoint is ipc:// in a private 0700 directory, and tcp:// is
accepted on loopback addresses only unless allow_remote=True. See zmq_endpoint for endpoint ownership.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from rapid.engine.client import EngineDeadError
from rapid.entrypoints.frontend import EngineFrontend, NeverFitsError, OverloadedError
from rapid.entrypoints.zmq_endpoint import Endpoint, reaper_dir_of
from rapid.entrypoints.zmq_limits import (
    HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, MiB, ZMQ_RCVHWM, ZMQ_SNDHWM, ServerLimits,
)
from rapid.entrypoints.zmq_monitor import close_monitored, open_disconnect_monitor
from rapid.entrypoints.zmq_peers import Clients, Job, Peer, Queued, aborted_reply
from rapid.entrypoints.zmq_requests import Envelope, RequestError, RequestReader
from rapid.entrypoints.zmq_waker import Waker
from rapid.protocol.api import ErrorReply
from rapid.protocol.engine import RequestDelta

logger = logging.getLogger(__name__)

POLL_MS = 50  # idle wait; also how soon stop() is noticed
BUSY_POLL_MS = 10  # wait while outboxes hold replies or probes are due
MAX_READS_PER_TURN = 256
MAX_ADMITS_PER_TURN = 64
DRAIN_ON_CLOSE_S = 5.0
CLOSE_LINGER_MS = 500  # time ZeroMQ gets to deliver the last replies at close


class RapidServer:
    """Serve `llm` on a ROUTER socket bound at `address` (default: ipc:// in a private temp directory).

    `frontend`: an EngineFrontend of `llm` to share (the caller closes it); None makes one owned by this server
    (then the LLM belongs to it until close()). `limits`: ServerLimits (defaults documented there)."""

    def __init__(self, llm, address: str | None = None, *, allow_remote: bool = False,
                 frontend: EngineFrontend | None = None, limits: ServerLimits | None = None):
        if limits is None:
            limits = ServerLimits()
        if not isinstance(limits, ServerLimits):
            raise TypeError(f"limits must be a ServerLimits, got {type(limits).__name__}")
        if frontend is not None and frontend.llm is not llm:
            raise ValueError("frontend serves another LLM than the one given")
        self.llm = llm
        self.limits = limits
        self._reader = RequestReader(llm, limits)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._monitor: zmq.Socket | None = None
        try:
            for opt, value in ((zmq.LINGER, 0), (zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, ZMQ_SNDHWM),
                               (zmq.RCVHWM, ZMQ_RCVHWM), (zmq.MAXMSGSIZE, limits.hard_frame_bytes),
                               (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS), (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)):
                self._sock.setsockopt(opt, value)
            self._endpoint = Endpoint(self._sock, address, allow_remote, reaper_dir=reaper_dir_of(llm))
            self._monitor = open_disconnect_monitor(self._sock)
        except BaseException:
            close_monitored(self._sock, self._monitor)
            self._ctx.term()
            raise
        self.address: str = self._endpoint.address
        self._waker = Waker()
        self._poller = zmq.Poller()
        for s in (self._sock, self._monitor, self._waker.fd):
            self._poller.register(s, zmq.POLLIN)
        self._deltas: queue.SimpleQueue[RequestDelta] = queue.SimpleQueue()
        self._rid_prefix = f"zmq-{secrets.token_hex(4)}-"
        self._rids = itertools.count()
        self._ready: deque[Peer] = deque()  # peers with queued requests, in round-robin order
        self._jobs: dict[str, Job] = {}  # engine request id -> job
        self._dead_reason: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._serving = False
        self._loop_thread, self._close_when_done = None, False  # serve_forever's thread; close() called in it
        self._thread: threading.Thread | None = None
        self._closed = False
        self.refusing = False  # refuse_new(): the shutdown's grace period
        self._owns_frontend = frontend is None
        try:
            self.frontend = frontend if frontend is not None else EngineFrontend(llm)
        except BaseException:
            self._release_socket(linger_ms=0)
            raise
        self._clients = Clients(self._sock, limits, self.frontend.abort)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RapidServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_active(self) -> int:
        """Requests of clients in the engine or waiting for it (read from another thread: a snapshot)."""
        return len(self._jobs) + sum(len(p.queue) for p in list(self._clients.peers.values()))

    def start(self) -> "RapidServer":
        """Run the socket thread in the background (daemon); returns self."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the server is already running or closed")
        self._thread = threading.Thread(target=self.serve_forever, name="rapid-zmq-server", daemon=True)
        self._thread.start()
        return self

    def refuse_new(self) -> None:
        """From any thread (a shutdown's grace period): answer new requests with an error; running ones go on."""
        self.refusing = True

    def stop(self) -> None:
        """Ask the loop to return (safe from signal handlers and other threads); close() releases everything."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until stop() or close(); in-flight requests are then aborted and their clients told."""
        with self._lock:
            if self._closed or self._serving:
                raise RuntimeError("the server is closed or already serving")
            self._serving = True
        self._done.clear()
        self._loop_thread = threading.get_ident()
        try:
            while not self._stop.is_set():
                self._turn()
        except Exception:
            logger.exception("server loop failed")
            raise
        finally:
            try:
                self._shutdown_requests()
            finally:
                self._done.set()
                if self._close_when_done:
                    self._finish_close()

    def close(self) -> None:
        """Stop the loop (waiting for it), tell waiting clients, release the socket, its files and the frontend
        (inside the loop's own thread, from a signal handler: at once; serve_forever finishes it as it returns)."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        elif self._serving and not self._done.is_set():
            if self._loop_thread == threading.get_ident():  # waiting here would wait for this very stack
                self._close_when_done = True
                return
            self._done.wait()
        self._finish_close()

    def _finish_close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            never_served = not self._serving
        if never_served:
            self._shutdown_requests()
        if self._owns_frontend:
            self.frontend.close()
        self._release_socket(CLOSE_LINGER_MS)

    def _release_socket(self, linger_ms: int) -> None:
        close_monitored(self._sock, self._monitor, linger_ms)
        self._ctx.term()  # waits for the I/O thread (at most the linger)
        self._endpoint.release()
        self._waker.close()

    # ------------------------------------------------------------------ the socket thread
    def _turn(self) -> None:
        timeout = 0 if self._admissible() else BUSY_POLL_MS if self._clients.busy else POLL_MS
        events = dict(self._poller.poll(timeout))
        if self._waker.fd in events:
            self._waker.drain()
        if self._monitor in events:
            self._read_monitor()
        self._take_deltas()
        if self._sock in events:
            self._read_messages()
        self._admit()
        self._clients.flush()
        self._clients.probe()
        self._watch_health()
        self._clients.forget_idle()

    def _on_delta(self, delta: RequestDelta) -> None:
        """Called on the engine loop's thread: hand the delta over, never block."""
        self._deltas.put(delta)
        self._waker.wake()

    def _read_monitor(self) -> None:
        while self._monitor.poll(0):
            if recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                self._clients.disconnected()

    def _watch_health(self) -> None:
        reason = self.frontend.dead_reason
        if reason != self._dead_reason:
            if reason is not None:
                logger.error("the engine is dead (%s); new requests are answered with an error", reason)
            else:
                logger.info("the engine is healthy again")
            self._dead_reason = reason

    # ------------------------------------------------------------------ reading
    def _read_messages(self) -> None:
        for _ in range(MAX_READS_PER_TURN):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                logger.warning("receive failed: %s", e)
                return
            try:
                self._on_frames(frames)
            except Exception:  # never let one message take the server down
                logger.exception("error handling a message")

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if self._clients.refuse_if_dropped(identity):
            return
        if len(frames) != 2:
            self._clients.error(identity, "", f"malformed message: expected 1 frame, got {len(frames) - 1}")
            return
        raw = frames[1].buffer
        env, cid, error = Envelope.read(raw)  # skips everything but three fields: cheap at any size
        limit = self.limits.max_frame_bytes
        if len(raw) > limit:
            self._clients.error(identity, cid, f"message of {len(raw)} bytes exceeds the server's limit of "
                                               f"{limit} bytes ({limit / MiB:g} MiB)")
        elif env is None:
            self._clients.error(identity, cid, error)
        elif env.type == "CancelRequest":
            try:
                self._reader.decode(raw)
            except RequestError as e:
                self._clients.error(identity, cid, str(e))
                return
            self._cancel(self._clients.get(identity), cid)
        else:
            self._enqueue(self._clients.get(identity), env, raw)

    def _enqueue(self, peer: Peer, env: Envelope, raw) -> None:
        cid, lim = env.client_request_id, self.limits
        if self.refusing:
            self._clients.send(peer, ErrorReply(cid, "the server is shutting down: no new requests"))
            return
        if not cid:
            self._clients.send(peer, ErrorReply(cid, "client_request_id must be a non-empty string"))
            return
        if cid in peer.requests:
            self._clients.send(peer, ErrorReply(cid, f"request {cid!r} is still running; use a new client_request_id"))
            return
        busy = None
        if len(peer.queue) >= lim.max_queued_per_client:
            busy = f"{len(peer.queue)} requests of this client wait (the limit is {lim.max_queued_per_client})"
        elif peer.queued_bytes + len(raw) > lim.max_queued_bytes_per_client:
            busy = (f"this client's waiting requests hold {peer.queued_bytes} bytes (the limit is "
                    f"{lim.max_queued_bytes_per_client})")
        elif self._clients.totals.queued_bytes + len(raw) > lim.max_queued_bytes_total:
            busy = f"waiting requests hold {self._clients.totals.queued_bytes} bytes (the limit is {lim.max_queued_bytes_total})"
        if busy is not None:
            self._clients.send(peer, ErrorReply(cid, f"server busy: {busy}; retry when earlier requests finish"))
            return
        old = peer.cancelled.pop(cid, None)
        if old is not None:  # the id was cancelled and is reused: the old request's last replies are not sent
            old.silenced = True
        peer.enqueue(Queued(cid, raw, env.stream, time.time()))
        if not peer.in_ready:
            peer.in_ready = True
            self._ready.append(peer)

    def _cancel(self, peer: Peer, cid: str) -> None:
        entry = peer.requests.pop(cid, None)  # unknown ids: already finished (a race) or never sent
        if isinstance(entry, Queued):
            peer.dequeue(entry)
            self._clients.send(peer, aborted_reply(entry))
        elif isinstance(entry, Job):
            entry.cancelled = True
            peer.cancelled[cid] = entry
            self.frontend.abort([entry.rid])

    # ------------------------------------------------------------------ admission
    def _room(self) -> bool:
        return self.frontend.num_pending < self.frontend.max_pending

    def _admissible(self) -> bool:
        cap = self.limits.max_inflight_per_client
        return self._room() and any(p.queue and p.inflight < cap for p in self._ready)

    def _admit(self) -> None:
        """Round-robin over clients with queued requests: one request each per pass, within their in-flight cap."""
        cap, budget, skipped = self.limits.max_inflight_per_client, MAX_ADMITS_PER_TURN, 0
        while self._ready and skipped < len(self._ready) and budget > 0:
            peer = self._ready.popleft()
            if peer.gone or not peer.queue:
                peer.in_ready = False
                continue
            if peer.inflight >= cap or not self._room():
                self._ready.append(peer)
                skipped += 1
                continue
            skipped = 0
            budget -= 1
            self._admit_one(peer, peer.dequeue())
            if peer.queue:
                self._ready.append(peer)
            else:
                peer.in_ready = False

    def _admit_one(self, peer: Peer, q: Queued) -> None:
        try:
            msg = self._reader.decode(q.raw)
            text, ids, params = self._reader.prepare(msg)
        except Exception as e:  # RequestError / the LLM's ValueError / TypeError; anything else is reported too
            del peer.requests[q.cid]
            self._clients.send(peer, ErrorReply(q.cid, str(e) if isinstance(e, (ValueError, TypeError))
                                        else f"{type(e).__name__}: {e}"))
            return
        rid = f"{self._rid_prefix}{next(self._rids)}"
        job = Job(peer, q.cid, rid, q.stream, text, ids, q.arrival_time)
        try:
            self.frontend.submit(rid, ids, params, self._on_delta, prompt=text)
        except (EngineDeadError, OverloadedError, NeverFitsError) as e:
            del peer.requests[q.cid]
            what = "engine error" if isinstance(e, EngineDeadError) else "server busy"
            self._clients.send(peer, ErrorReply(q.cid, f"{what}: {e}"))
            return
        peer.requests[q.cid] = job
        peer.inflight += 1
        self._jobs[rid] = job

    # ------------------------------------------------------------------ replies
    def _take_deltas(self) -> None:
        while True:
            try:
                d = self._deltas.get_nowait()
            except queue.Empty:
                return
            job = self._jobs.get(d.request_id)
            if job is None:
                continue
            reply = job.reply_for(d)
            if d.finished or d.error is not None:
                self._end(job)
            if reply is not None and not job.silenced:
                self._clients.send(job.peer, reply)

    def _end(self, job: Job) -> None:
        del self._jobs[job.rid]
        peer = job.peer
        peer.inflight -= 1
        if peer.requests.get(job.cid) is job:
            del peer.requests[job.cid]
        if peer.cancelled.get(job.cid) is job:
            del peer.cancelled[job.cid]

    def _shutdown_requests(self) -> None:
        """Tell every waiting client, abort its requests and (on a shared frontend) wait for their ends, bounded."""
        for peer in list(self._clients.peers.values()):
            while peer.queue:
                q = peer.dequeue()
                self._clients.send(peer, ErrorReply(q.cid, "the server is shutting down"))
        for job in list(self._jobs.values()):
            if not job.silenced:
                self._clients.send(job.peer, ErrorReply(job.cid, "the server is shutting down"))
                job.silenced = True
        if self._jobs:
            self.frontend.abort(list(self._jobs))
        deadline = time.monotonic() + DRAIN_ON_CLOSE_S
        while self._jobs and not self._owns_frontend and time.monotonic() < deadline:
            self._take_deltas()
            self._waker.drain()
            time.sleep(0.01)
        if self._jobs and not self._owns_frontend:
            logger.warning("%d aborted request(s) did not finish within %.0f s", len(self._jobs), DRAIN_ON_CLOSE_S)
        for peer in list(self._clients.peers.values()):
            peer.flush(self._sock)

"""Per-client state of the ZeroMQ server: queued requests, running jobs, and an outbox of replies with byte counts.

Owned by the server's socket thread (nothing here is locked). A `Peer` is one ROUTER identity (one client
connection). `Totals` sums the bytes every peer holds, so `Clients` can bound them over all clients, drop a
client that does not read, and probe for clients that went away.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from rapid.entrypoints.zmq_limits import ServerLimits
from rapid.protocol.api import Completion, Delta, ErrorReply
from rapid.protocol.engine import RequestDelta

logger = logging.getLogger(__name__)

SENT, QUEUED, GONE = "sent", "queued", "gone"
PROBE_WINDOW_S = 1.0  # after a disconnect, probe clients with requests for this long...
PROBE_EVERY_S = 0.1  # ...this often
MAX_DROPPED_REMEMBERED = 4096  # dropped connections whose later messages are refused


@dataclass
class Totals:
    queued_bytes: int = 0  # raw request frames waiting for admission, all peers
    reply_bytes: int = 0  # encoded replies in outboxes, all peers


@dataclass
class Queued:
    """A request read from the socket, not yet decoded or admitted (only its envelope is known)."""

    cid: str
    raw: memoryview | bytes
    stream: bool
    arrival_time: float


@dataclass
class Job:
    """A request admitted to the engine under the engine id `rid`; builds its client's replies from deltas."""

    peer: "Peer"
    cid: str
    rid: str
    stream: bool
    prompt: str | None
    prompt_token_ids: list[int]
    arrival_time: float
    cancelled: bool = False
    silenced: bool = False  # send nothing more (the client reused the id, went away or was dropped)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    with_logprobs: bool = False  # a streamed request's deltas have carried logprobs
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    def reply_for(self, d: RequestDelta) -> Delta | Completion | ErrorReply | None:
        """What to send the client for this delta (None: accumulated for the Completion)."""
        if d.error is not None:
            error = d.error.replace(self.rid, self.cid)  # never show the internal id
            return ErrorReply(self.cid, error if error.startswith("engine error") else f"engine error: {error}")
        if self.stream:
            self.with_logprobs = self.with_logprobs or d.new_logprobs is not None
            return Delta(self.cid, list(d.new_token_ids), d.new_text, new_logprobs=d.new_logprobs,
                         cumulative_logprob=d.cumulative_logprob if self.with_logprobs else None,
                         finished=d.finished, finish_reason=d.finish_reason,
                         stop_reason=d.stop_reason, num_prompt_tokens=len(self.prompt_token_ids),
                         num_cached_tokens=d.num_cached_tokens)
        self._accumulate(d)
        if not d.finished:
            return None
        return Completion(self.cid, self.prompt, self.prompt_token_ids, "".join(self.text), self.token_ids,
                          d.finish_reason, stop_reason=d.stop_reason, logprobs=self.logprobs,
                          cumulative_logprob=self.cumulative_logprob, num_cached_tokens=self.num_cached_tokens,
                          arrival_time=self.arrival_time, first_token_time=self.first_token_time,
                          last_token_time=self.last_token_time)

    def _accumulate(self, d: RequestDelta) -> None:
        self.text.append(d.new_text)
        self.token_ids.extend(d.new_token_ids)
        if d.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.new_logprobs)  # in place: no copy of the whole list per delta
            self.cumulative_logprob = d.cumulative_logprob
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        if d.first_token_time is not None and self.first_token_time is None:
            self.first_token_time = d.first_token_time
        if d.last_token_time is not None:
            self.last_token_time = max(self.last_token_time or 0.0, d.last_token_time)


def aborted_reply(q: Queued) -> Delta | Completion:
    """The final reply of a request cancelled before it reached the engine."""
    if q.stream:
        return Delta(q.cid, [], "", finished=True, finish_reason="abort")
    return Completion(q.cid, None, [], "", [], "abort", arrival_time=q.arrival_time)


def try_send(sock: zmq.Socket, identity: bytes, frame: bytes) -> str:
    """SENT, QUEUED (ZeroMQ's pipe to the peer is full: keep it) or GONE (no such peer any more)."""
    try:
        sock.send_multipart([identity, frame], flags=zmq.NOBLOCK)
        return SENT
    except zmq.Again:
        return QUEUED
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:
            return GONE
        logger.warning("reply to %s dropped: %s", identity.hex(), e)
        return SENT


class Peer:
    """One client connection: its requests by client id, its admission queue, its in-flight count, its outbox."""

    def __init__(self, identity: bytes, totals: Totals):
        self.identity = identity
        self.totals = totals
        self.requests: dict[str, Queued | Job] = {}  # what the client may cancel, by its id
        self.cancelled: dict[str, Job] = {}  # cancelled jobs still in the engine, by client id
        self.queue: deque[Queued] = deque()
        self.queued_bytes = 0
        self.inflight = 0  # jobs in the engine (cancelled ones too, until their last delta)
        self.in_ready = False  # listed in the server's round-robin admission queue
        self.outbox: deque[bytes] = deque()
        self.outbox_bytes = 0
        self.last_progress = time.monotonic()  # last time ZeroMQ took a reply of the outbox
        self.gone = False

    @property
    def idle(self) -> bool:
        return not (self.requests or self.cancelled or self.queue or self.outbox or self.inflight)

    # ------------------------------------------------------------------ admission queue
    def enqueue(self, q: Queued) -> None:
        self.queue.append(q)
        self.requests[q.cid] = q
        self.queued_bytes += len(q.raw)
        self.totals.queued_bytes += len(q.raw)

    def dequeue(self, q: Queued | None = None) -> Queued:
        """The next queued request (or `q`, taken out of the middle: a cancel)."""
        if q is None:
            q = self.queue.popleft()
        else:
            self.queue.remove(q)
        self.queued_bytes -= len(q.raw)
        self.totals.queued_bytes -= len(q.raw)
        return q

    # ------------------------------------------------------------------ replies
    def send(self, sock: zmq.Socket, frame: bytes) -> str:
        """Send now, or keep it in the outbox (behind earlier replies, so their order holds)."""
        if not self.outbox:
            result = try_send(sock, self.identity, frame)
            if result != QUEUED:
                return result
            self.last_progress = time.monotonic()  # the stall clock starts with the first reply held
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        self.totals.reply_bytes += len(frame)
        return QUEUED

    def flush(self, sock: zmq.Socket) -> str:
        """Hand ZeroMQ what it takes of the outbox: SENT (emptied), QUEUED (some left) or GONE."""
        while self.outbox:
            result = try_send(sock, self.identity, self.outbox[0])
            if result != SENT:
                return result
            frame = self.outbox.popleft()
            self.outbox_bytes -= len(frame)
            self.totals.reply_bytes -= len(frame)
            self.last_progress = time.monotonic()
        return SENT

    def release(self) -> list[Job]:
        """Forget the queue and the outbox (their bytes leave the totals); the running jobs, silenced, to abort."""
        self.gone = True
        self.totals.queued_bytes -= self.queued_bytes
        self.totals.reply_bytes -= self.outbox_bytes
        self.queue.clear()
        self.outbox.clear()
        self.queued_bytes = self.outbox_bytes = 0
        jobs = [r for r in self.requests.values() if isinstance(r, Job)] + list(self.cancelled.values())
        for job in jobs:
            job.silenced = True
        self.requests.clear()
        self.cancelled.clear()
        return [job for job in jobs if not job.cancelled]


class Clients:
    """Every client's Peer, the replies to them, and the reply bounds: a client over them is dropped.

    `abort(engine ids)` ends the engine requests of a client that went away or was dropped."""

    def __init__(self, sock: zmq.Socket, limits: ServerLimits, abort: Callable[[list[str]], None]):
        self.sock = sock
        self.limits = limits
        self._abort = abort
        self.totals = Totals()
        self.peers: dict[bytes, Peer] = {}
        self._dropped: OrderedDict[bytes, None] = OrderedDict()
        self._encoder = msgspec.msgpack.Encoder()
        self._probe_until = self._next_probe = 0.0

    def get(self, identity: bytes) -> Peer:
        peer = self.peers.get(identity)
        if peer is None:
            peer = self.peers[identity] = Peer(identity, self.totals)
        return peer

    def refuse_if_dropped(self, identity: bytes) -> bool:
        """True (and a best-effort ErrorReply, never queued) for a message on a dropped connection."""
        if identity not in self._dropped:
            return False
        try_send(self.sock, identity, self._encoder.encode(ErrorReply(
            "", "this connection was dropped for not reading its replies; reconnect")))
        return True

    def send(self, peer: Peer, msg) -> None:
        if peer.gone:
            return
        lim = self.limits
        if peer.send(self.sock, self._encoder.encode(msg)) == GONE:
            self.release(peer, "disconnected")
        elif peer.outbox_bytes > lim.max_reply_bytes_per_client:
            self.release(peer, f"holds {peer.outbox_bytes} bytes of unread replies (the limit is "
                               f"{lim.max_reply_bytes_per_client})", drop=True)
        elif self.totals.reply_bytes > lim.max_reply_bytes_total:
            worst = max(self.peers.values(), key=lambda p: p.outbox_bytes)
            self.release(worst, f"holds the most unread replies ({worst.outbox_bytes} bytes) while all clients "
                                f"hold {self.totals.reply_bytes} (the limit is {lim.max_reply_bytes_total})", drop=True)

    def error(self, identity: bytes, cid: str, message: str) -> None:
        self.send(self.get(identity), ErrorReply(cid, message))

    def release(self, peer: Peer, why: str, drop: bool = False) -> None:
        """The client went away (or is dropped): abort its requests, free its queue and outbox."""
        if peer.gone:
            return
        jobs = peer.release()
        self.peers.pop(peer.identity, None)
        logger.log(logging.WARNING if drop else logging.INFO, "client %s %s: %s; aborting %d request(s)",
                   peer.identity.hex(), "dropped" if drop else "gone", why, len(jobs))
        if drop:
            self._dropped[peer.identity] = None
            while len(self._dropped) > MAX_DROPPED_REMEMBERED:
                self._dropped.popitem(last=False)
        for job in jobs:
            job.cancelled = True
        if jobs:
            self._abort([job.rid for job in jobs])

    def flush(self) -> None:
        """Hand ZeroMQ what it takes of each outbox; drop a client whose replies have not moved for reply_stall_s."""
        now = time.monotonic()
        for peer in [p for p in self.peers.values() if p.outbox]:
            if peer.flush(self.sock) == GONE:
                self.release(peer, "disconnected")
            elif peer.outbox and now - peer.last_progress > self.limits.reply_stall_s:
                self.release(peer, f"read none of its replies for {self.limits.reply_stall_s:g} s", drop=True)

    @property
    def busy(self) -> bool:
        """Replies wait in an outbox or probes are due: poll often."""
        return time.monotonic() < self._probe_until or any(p.outbox for p in self.peers.values())

    def disconnected(self) -> None:
        """Some connection closed: probe the clients with requests for a while."""
        self._probe_until = time.monotonic() + PROBE_WINDOW_S
        self._next_probe = 0.0

    def probe(self) -> None:
        """While a disconnect is recent, send an empty frame to each client with requests: a vanished one fails."""
        now = time.monotonic()
        if now >= self._probe_until or now < self._next_probe:
            return
        self._next_probe = now + PROBE_EVERY_S
        for peer in list(self.peers.values()):
            if (peer.inflight or peer.queue) and not peer.outbox and try_send(self.sock, peer.identity, b"") == GONE:
                self.release(peer, "disconnected")

    def forget_idle(self) -> None:
        for identity in [i for i, p in self.peers.items() if p.idle]:
            del self.peers[identity]

"""RapidServer: an LLM behind a ZeroMQ ROUTER socket, for rapid.client.Client / AsyncClient.

Wire format: one msgpack frame per message (rapid.protocol, section "public client <-> server"); the
ROUTER adds the peer's identity frame. A client (a DEALER socket) sends GenerateRequest / ChatRequest /
CancelRequest with ids of its own choosing; the server answers each request with Delta messages (stream=True,
the last one finished=True) or one Completion, or with an ErrorReply. Engine request ids are
"<peer identity hex>:<client id>", so clients cannot collide (or cancel each other's requests).

One thread runs the loop (`serve_forever`, or `start()` for a background thread): it reads the socket
without blocking while the engine has work and runs `llm.engine.get_deltas` between reads; with nothing in
flight it sleeps in zmq poll. Nothing a peer sends can stop the loop: bad bytes, wrong frame counts, bad
parameters and prompts the engine would refuse get an ErrorReply (client_request_id '' when the message
could not be read at all). The LLM belongs to the loop while it runs: do not call it from another thread.

There is no authentication, so the default endpoint is ipc:// in a private 0700 directory, and tcp:// is
accepted on loopback addresses only unless allow_remote=True.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from rapid.protocol.engine import AddRequest, RequestDelta
from rapid.protocol.api import (
    CancelRequest, ChatRequest, ClientMessage, Completion, Delta, ErrorReply, GenerateRequest,
)
from rapid.engine import ipc

logger = logging.getLogger(__name__)

POLL_MS = 50  # idle wait on the socket; also how soon stop() is noticed
MAX_READS_PER_STEP = 256  # socket messages handled between two engine steps
MAX_MESSAGE_BYTES = 64 << 20  # a peer that sends more is disconnected by ZeroMQ
DRAIN_ON_CLOSE_S = 5.0
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def check_address(address: str, allow_remote: bool = False) -> None:
    """ValueError unless `address` is ipc://..., or tcp:// on a loopback host (any host with allow_remote)."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str such as 'ipc:///path' or 'tcp://127.0.0.1:5555', got {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("ipc", "tcp"):
        raise ValueError(f"address {address!r}: use ipc://<path> or tcp://<host>:<port>")
    if scheme == "ipc":
        if not rest:
            raise ValueError("address 'ipc://' needs a path (or give no address for a private one)")
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port:
        raise ValueError(f"address {address!r}: tcp:// needs <host>:<port> (port '*' picks a free one)")
    if allow_remote:
        return
    if host in LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"address {address!r} is not a loopback address; the server has no authentication, so anyone who can "
        "reach it can use the model. Pass allow_remote=True to bind it anyway (behind a firewall or tunnel)."
    )


@dataclass
class _Job:
    identity: bytes
    client_id: str
    stream: bool
    prompt: str | None
    prompt_token_ids: list[int]
    arrival_time: float
    cancelled: bool = False
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None


class RapidServer:
    """Serve `llm` on a ROUTER socket bound at `address` (default: ipc:// in a private temp directory)."""

    def __init__(self, llm, address: str | None = None, *, allow_remote: bool = False):
        self.llm = llm
        self._dir: str | None = None
        if address is None:
            self._dir = ipc.private_socket_dir()
            address = ipc.endpoint(self._dir, "server")
        else:
            check_address(address, allow_remote)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises: abort its requests
            self._sock.setsockopt(zmq.SNDHWM, 0)  # never drop a streamed delta because a client reads slowly
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            self._sock.bind(address)
            self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)  # tcp port '*' resolved
        except BaseException:
            self._sock.close(linger=0)
            self._ctx.term()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ClientMessage)
        self._jobs: dict[str, _Job] = {}  # engine request id -> job
        self._stop = threading.Event()
        self._done = threading.Event()
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RapidServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_active(self) -> int:
        """Requests in the engine on behalf of clients (read from another thread: a snapshot)."""
        return len(self._jobs)

    def start(self) -> "RapidServer":
        """Run the loop in a background (daemon) thread; returns self."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the server is already running or closed")
        self._thread = threading.Thread(target=self.serve_forever, name="rapid-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to return (safe from signal handlers and other threads); close() releases the socket."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until stop() or close(); in-flight requests are then aborted and their clients told."""
        with self._lock:
            if self._closed or self._loop_thread is not None:
                raise RuntimeError("the server is closed or already serving")
            self._loop_thread = threading.get_ident()
        self._done.clear()
        try:
            while not self._stop.is_set():
                self.poll_once()
        except Exception:
            logger.exception("server loop failed")
            raise
        finally:
            try:
                self._abort_all("the server is shutting down")
            finally:
                self._loop_thread = None
                self._done.set()

    def close(self) -> None:
        """Stop the loop (waiting for it), close the socket (linger 0) and remove the private directory."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        elif self._loop_thread is not None and self._loop_thread != threading.get_ident():
            self._done.wait()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._loop_thread is None and self._jobs:  # poll_once driven by hand
            self._abort_all("the server is shutting down")
        self._sock.close(linger=0)
        self._ctx.term()  # waits for the I/O thread
        if self.address.startswith("ipc://"):  # libzmq leaves the socket file behind
            _unlink_socket(self.address.removeprefix("ipc://"))
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ the loop
    def poll_once(self) -> None:
        """One turn: read what clients sent (waiting up to POLL_MS when idle), then one engine step if busy."""
        if self._sock.poll(0 if self._jobs else POLL_MS, zmq.POLLIN):
            for _ in range(MAX_READS_PER_STEP):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:
                    logger.warning("receive failed: %s", e)
                    break
                try:
                    self._on_frames(frames)
                except Exception:  # never let one message take the server down
                    logger.exception("error handling a message")
        if self._jobs:
            self._pump_engine(POLL_MS / 1000)

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._reply(identity, ErrorReply("", f"malformed message: expected 1 frame, got {len(frames) - 1}"))
            return
        raw = frames[1]
        try:
            msg = self._decoder.decode(raw)
        except Exception as e:  # DecodeError / ValidationError (and RecursionError for absurd nesting)
            self._reply(identity, ErrorReply(_salvage_id(raw), f"malformed message: {e}"))
            return
        if isinstance(msg, CancelRequest):
            self._cancel(identity, msg.client_request_id)
        else:
            self._submit(identity, msg)

    def _submit(self, identity: bytes, msg: GenerateRequest | ChatRequest) -> None:
        cid = msg.client_request_id
        if not cid:
            self._reply(identity, ErrorReply(cid, "client_request_id must be a non-empty string"))
            return
        rid = _engine_id(identity, cid)
        if rid in self._jobs:
            self._reply(identity, ErrorReply(cid, f"request {cid!r} is still running; use a new client_request_id"))
            return
        params = msg.params
        try:
            if params.n != 1:
                raise ValueError("the server takes n=1; send n requests (with distinct seeds) instead")
            if isinstance(msg, GenerateRequest):
                if (msg.prompt is None) == (msg.prompt_token_ids is None):
                    raise ValueError("give exactly one of prompt and prompt_token_ids")
                prompt: Any = msg.prompt if msg.prompt is not None else {"prompt_token_ids": msg.prompt_token_ids}
                text, ids = self.llm.validate(prompt, params)
            else:
                if not msg.messages:
                    raise ValueError("messages is empty")
                ids = self.llm.chat_prompt_ids(msg.messages, msg.add_generation_prompt)
                _, ids = self.llm.validate({"prompt_token_ids": ids}, params)
                text = self.llm.tokenizer.decode(ids)
            arrival = time.time()
            self.llm.engine.add_request(AddRequest(rid, ids, params, prompt=text, arrival_time=arrival))
        except Exception as e:  # the engine's own refusals are ValueError / TypeError; anything else is reported too
            message = str(e) if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: {e}"
            self._reply(identity, ErrorReply(cid, message))
            return
        self._jobs[rid] = _Job(identity, cid, msg.stream, text, ids, arrival)

    def _cancel(self, identity: bytes, cid: str) -> None:
        job = self._jobs.get(_engine_id(identity, cid))
        if job is not None and not job.cancelled:  # unknown ids: already finished (a race) or never sent
            job.cancelled = True
            self.llm.engine.abort([_engine_id(identity, cid)])

    def _pump_engine(self, timeout_s: float) -> None:
        try:
            deltas = self.llm.engine.get_deltas(timeout_s=timeout_s)
        except Exception as e:  # the engine is dead: every request fails, later ones are refused by add_request
            logger.error("engine failed: %s", e)
            for rid, job in list(self._jobs.items()):
                del self._jobs[rid]
                self._reply(job.identity, ErrorReply(job.client_id, f"engine error: {e}"))
            return
        for d in deltas:
            job = self._jobs.get(d.request_id)
            if job is None:
                continue
            if d.error is not None:
                del self._jobs[d.request_id]
                self._reply(job.identity, ErrorReply(job.client_id, f"engine error: {d.error}"))
                continue
            if d.finished:
                del self._jobs[d.request_id]
            if job.stream:
                self._reply(job.identity, Delta(
                    job.client_id, list(d.new_token_ids), d.new_text, new_logprobs=d.new_logprobs,
                    cumulative_logprob=d.cumulative_logprob, finished=d.finished, finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason, num_prompt_tokens=len(job.prompt_token_ids),
                    num_cached_tokens=d.num_cached_tokens,
                ))
            else:
                _accumulate(job, d)
                if d.finished:
                    self._reply(job.identity, Completion(
                        job.client_id, job.prompt, job.prompt_token_ids, "".join(job.text), job.token_ids,
                        d.finish_reason, stop_reason=d.stop_reason, logprobs=job.logprobs,
                        cumulative_logprob=job.cumulative_logprob, num_cached_tokens=job.num_cached_tokens,
                        arrival_time=job.arrival_time, first_token_time=job.first_token_time,
                        last_token_time=job.last_token_time,
                    ))

    def _reply(self, identity: bytes, msg: Delta | Completion | ErrorReply) -> None:
        try:
            self._sock.send_multipart([identity, self._encoder.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:  # the client went away: stop working for it
                self._peer_gone(identity)
            else:
                logger.warning("reply to %s dropped: %s", identity.hex(), e)

    def _peer_gone(self, identity: bytes) -> None:
        gone = [rid for rid, job in self._jobs.items() if job.identity == identity and not job.cancelled]
        if gone:
            logger.info("client %s disconnected: aborting %d request(s)", identity.hex(), len(gone))
            for rid in gone:
                self._jobs[rid].cancelled = True
            try:
                self.llm.engine.abort(gone)
            except Exception as e:
                logger.warning("abort failed: %s", e)

    def _abort_all(self, reason: str) -> None:
        """Tell every waiting client, abort its request in the engine and drain the engine (bounded)."""
        if not self._jobs:
            return
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            self._reply(job.identity, ErrorReply(job.client_id, reason))
        pending = set(jobs)
        try:
            self.llm.engine.abort(sorted(pending))
            deadline = time.monotonic() + DRAIN_ON_CLOSE_S
            while pending and time.monotonic() < deadline:
                for d in self.llm.engine.get_deltas(timeout_s=0.1):
                    if d.finished:
                        pending.discard(d.request_id)
        except Exception as e:
            logger.warning("draining aborted requests failed: %s", e)
        if pending:
            logger.warning("%d aborted request(s) did not finish within %.0fs", len(pending), DRAIN_ON_CLOSE_S)


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _engine_id(identity: bytes, client_id: str) -> str:
    return f"{identity.hex()}:{client_id}"


def _salvage_id(raw: bytes) -> str:
    """The client_request_id of a message that failed validation, if it has one (for the ErrorReply)."""
    try:
        obj = msgspec.msgpack.decode(raw)
    except Exception:
        return ""
    cid = obj.get("client_request_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else ""


def _accumulate(job: _Job, d: RequestDelta) -> None:
    job.text.append(d.new_text)
    job.token_ids.extend(d.new_token_ids)
    if d.new_logprobs is not None:
        job.logprobs = (job.logprobs or []) + list(d.new_logprobs)
        job.cumulative_logprob = d.cumulative_logprob
    job.num_cached_tokens = max(job.num_cached_tokens, d.num_cached_tokens)
    if d.first_token_time is not None and job.first_token_time is None:
        job.first_token_time = d.first_token_time
    if d.last_token_time is not None:
        job.last_token_time = max(job.last_token_time or 0.0, d.last_token_time)


def serve(args) -> None:
    """`rapid serve`: build the LLM from the CLI arguments, print the address, serve until SIGINT / SIGTERM."""
    from rapid.config import EngineArgs
    from rapid.entrypoints.llm import LLM

    with LLM.from_engine_args(EngineArgs.from_cli_args(args)) as llm:
        server = RapidServer(llm, getattr(args, "address", None), allow_remote=getattr(args, "allow_remote", False))
        previous = {}

        def on_signal(signum, _frame):
            server.stop()
            # a second signal acts as usual (KeyboardInterrupt / termination) if shutdown hangs
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        try:
            print(f"RAPID serving {llm.config.model} ({llm.config.mode} mode) at {server.address}", flush=True)
            server.serve_forever()
        finally:
            server.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            print("RAPID server stopped", flush=True)

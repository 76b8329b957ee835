"""Clients of rapid.server.RapidServer: `Client` (blocking) and `AsyncClient` (asyncio, zmq.asyncio).

    with Client(address) as c:
        out = c.generate("The capital of France is", SamplingParams(max_tokens=16))  # -> Completion
        for d in c.stream("Once upon a time", SamplingParams(max_tokens=64)):      # -> Delta, ...
            print(d.new_text, end="")

    async with AsyncClient(address) as c:
        out = await c.generate("hello")
        async for d in c.stream("hello"):
            ...

A prompt is a str, a list of token ids, {'prompt': str} or {'prompt_token_ids': [...]} (as LLM.generate takes);
chat() and chat_stream() take a list of {'role', 'content'} dicts. Requests the server refuses raise ServerError with
its message. Each client owns one DEALER socket: use a Client from one thread at a time (several requests
may still be interleaved: replies are sorted by request id), and an AsyncClient from one event loop
(any number of concurrent coroutines). Breaking out of a stream cancels the request on the server once the stream
is closed: at once for `for d in c.stream(...): break`; an iterator kept in a variable needs `close()` (`aclose()`
for AsyncClient's), or goes when it is dropped.
When the connection to the server closes (the server stopped or was killed), every request in flight raises
ServerError: the server has forgotten them (they used to wait forever, or until `timeout_s`). A request sent while
no connection is open waits at most `connect_timeout_s` (5 s; None: no limit) for one (ZeroMQ's handshake with a
server, seen by the socket's monitor), then raises NoServerError (a ServerError and a ConnectionError) naming the
address: with nothing listening there it used to wait forever when `timeout_s` was None.
A request whose encoding exceeds `max_message_bytes` (the server's default frame limit, 4 MiB) raises
ValueError before it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

import msgspec
import zmq

from rapid.entrypoints.client_wire import (
    CONNECT_TIMEOUT_S, NoServerError, ServerError, chat_request, connection_event, dealer, decode_reply, encode,
    expect, generate_request, lost, no_server, unclaimed,
)
from rapid.entrypoints.zmq_monitor import close_monitored
from rapid.params import SamplingParams
from rapid.protocol.api import CancelRequest, Completion, Delta, ErrorReply, ServerMessage

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20  # the server's default ServerLimits.max_frame_bytes

__all__ = ["Client", "AsyncClient", "ServerError", "NoServerError", "Completion", "Delta"]


class Client:
    """Blocking client. `timeout_s`: longest wait for the next reply (None: forever) before TimeoutError;
    `connect_timeout_s`: longest wait of a request for a connection to the server before NoServerError (None:
    forever). One thread at a time (its ZeroMQ socket is not thread-safe): a request from a second thread while
    another's are open raises RuntimeError; use a Client per thread, or an AsyncClient."""

    def __init__(self, address: str, *, timeout_s: float | None = None, context: zmq.Context | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, connect_timeout_s: float | None = CONNECT_TIMEOUT_S):
        self.address = address
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._connected = False  # a connection to the server is open (its handshake done, not closed since)
        self._sock, self._monitor = dealer(context or zmq.Context.instance(), address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ServerMessage)
        self._ids = itertools.count()
        self._inbox: dict[str, deque[ServerMessage]] = {}
        self._closed = False
        self._user: int | None = None  # the thread that last claimed the client (its requests: the open inboxes)
        self._user_lock = threading.Lock()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close_monitored(self._sock, self._monitor)

    # ------------------------------------------------------------------ requests
    def generate(self, prompt, params: SamplingParams | dict | None = None) -> Completion:
        return self._unary(generate_request(self._new_id(), prompt, params, stream=False))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
             add_generation_prompt: bool = True) -> Completion:
        return self._unary(chat_request(self._new_id(), messages, params, False, add_generation_prompt))

    def stream(self, prompt, params: SamplingParams | dict | None = None) -> Iterator[Delta]:
        """Deltas as they are produced; the last has finished=True. Sent when iteration starts."""
        return self._stream(generate_request(self._new_id(), prompt, params, stream=True))

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                    add_generation_prompt: bool = True) -> Iterator[Delta]:
        return self._stream(chat_request(self._new_id(), messages, params, True, add_generation_prompt))

    def cancel(self, client_request_id: str) -> None:
        """Abort a request; its stream still ends with a finished Delta (finish_reason 'abort')."""
        self._send(CancelRequest(client_request_id))

    # ------------------------------------------------------------------ plumbing
    def _new_id(self) -> str:
        return str(next(self._ids))

    def _send(self, msg) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        with self._user_lock:
            self._claim()
        self._sock.send(encode(self._encoder, msg, self.max_message_bytes))

    def _claim(self) -> None:
        """(Under _user_lock.) RuntimeError when another thread has requests open here: they would lose replies."""
        if self._inbox and self._user != threading.get_ident():
            raise RuntimeError("this Client is in use by another thread; a Client serves one thread at a time "
                               "(use one Client per thread, or an AsyncClient)")
        self._user = threading.get_ident()

    def _open(self, cid: str) -> None:
        """An inbox for a new request, after what arrived while the client was idle is sorted: a connection that
        closed meanwhile ends the requests sent before it, not this one (it goes to the server now up)."""
        if self._closed:
            raise RuntimeError("the client is closed")
        with self._user_lock:
            self._claim()
            while self._poller.poll(0):
                self._receive()
            self._inbox[cid] = deque()

    def _unary(self, req) -> Completion:
        cid = req.client_request_id
        self._open(cid)
        done = False
        try:
            self._send(req)
            msg = self._next(cid)
            done = True
            return expect(msg, Completion, "non-streamed")
        finally:
            del self._inbox[cid]
            if not done and not self._closed:  # interrupted or timed out: free the engine
                self.cancel(cid)

    def _stream(self, req) -> Iterator[Delta]:
        cid = req.client_request_id
        self._open(cid)
        done = False
        try:
            self._send(req)
            while True:
                msg = self._next(cid)
                if isinstance(msg, ErrorReply) or (isinstance(msg, Delta) and msg.finished):
                    done = True
                delta = expect(msg, Delta, "streamed")
                yield delta
                if done:
                    return
        finally:
            self._inbox.pop(cid, None)
            if not done and not self._closed:  # the caller stopped early: abort on the server
                self.cancel(cid)

    def _next(self, cid: str) -> ServerMessage:
        box = self._inbox[cid]
        wait_s = connect_wait(self.connect_timeout_s, self.timeout_s)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while not box and not self._connected and deadline is not None:  # no server yet: wait for one, not forever
            left = deadline - time.monotonic()
            if left <= 0:
                raise no_server(self.address, wait_s)
            if self._poller.poll(int(left * 1000) + 1):
                self._receive()
        timeout_ms = None if self.timeout_s is None else int(self.timeout_s * 1000)
        while not box:
            if not self._poller.poll(timeout_ms):
                raise TimeoutError(f"no reply from {self.address} within {self.timeout_s}s")
            self._receive()
        return box.popleft()

    def _receive(self) -> None:
        """Sort one reply into its request's box; or, the connection closed (the replies it brought are read
        first), end every request in flight."""
        if self._sock.poll(0, zmq.POLLIN):
            msg = decode_reply(self._decoder, self._sock.recv(), self.address)
            if msg is None:
                return
            other = self._inbox.get(msg.client_request_id)
            if other is not None:
                other.append(msg)
            else:
                unclaimed(msg)
        elif self._monitor.poll(0, zmq.POLLIN):
            self._connected = connection_event(self._monitor.recv_multipart())
            if not self._connected:
                for cid, box in self._inbox.items():
                    box.append(lost(cid, self.address))


class AsyncClient:
    """asyncio client (zmq.asyncio): `await generate(...)`, `async for d in stream(...)`; concurrent use is fine.
    `timeout_s` and `connect_timeout_s` as Client's."""

    def __init__(self, address: str, *, timeout_s: float | None = None, context=None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, connect_timeout_s: float | None = CONNECT_TIMEOUT_S):
        import zmq.asyncio

        self.address = address
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.max_message_bytes = max_message_bytes
        self._connected = asyncio.Event()  # set while a connection to the server is open (set by the reader)
        self._sock, self._monitor = dealer(context or zmq.asyncio.Context.instance(), address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ServerMessage)
        self._ids = itertools.count()
        self._inbox: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for cid, q in self._inbox.items():  # requests other tasks still await end now, instead of never
            q.put_nowait(ErrorReply(cid, "the client was closed before this request ended"))
        close_monitored(self._sock, self._monitor)

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt, params: SamplingParams | dict | None = None) -> Completion:
        return await self._unary(generate_request(self._new_id(), prompt, params, stream=False))

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                   add_generation_prompt: bool = True) -> Completion:
        return await self._unary(chat_request(self._new_id(), messages, params, False, add_generation_prompt))

    def stream(self, prompt, params: SamplingParams | dict | None = None) -> AsyncIterator[Delta]:
        return self._stream(generate_request(self._new_id(), prompt, params, stream=True))

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                    add_generation_prompt: bool = True) -> AsyncIterator[Delta]:
        return self._stream(chat_request(self._new_id(), messages, params, True, add_generation_prompt))

    async def cancel(self, client_request_id: str) -> None:
        await self._send(CancelRequest(client_request_id))

    # ------------------------------------------------------------------ plumbing
    def _new_id(self) -> str:
        return str(next(self._ids))

    async def _send(self, msg) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        await self._sock.send(encode(self._encoder, msg, self.max_message_bytes))

    async def _read_loop(self) -> None:
        poller = zmq.asyncio.Poller()  # (zmq.asyncio imported by __init__)
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        # Events that came while no reader ran (between event loops: asyncio.run per call) are older than the
        # requests now waiting: they set the connection state and end none of them.
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
            if connection_event(await self._monitor.recv_multipart()):
                self._connected.set()
            else:
                self._connected.clear()
        try:
            while True:
                ready = dict(await poller.poll())
                if self._sock not in ready:  # a connection opened, or closed (the replies it brought were read first)
                    if connection_event(await self._monitor.recv_multipart()):
                        self._connected.set()
                        continue
                    self._connected.clear()
                    for cid, q in self._inbox.items():
                        q.put_nowait(lost(cid, self.address))
                    continue
                msg = decode_reply(self._decoder, await self._sock.recv(), self.address)
                if msg is None:
                    continue
                q = self._inbox.get(msg.client_request_id)
                if q is not None:
                    q.put_nowait(msg)
                else:
                    unclaimed(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket failed: wake every waiter with an error
            for cid, q in self._inbox.items():
                q.put_nowait(ErrorReply(cid, f"client receive failed: {e}"))
            raise

    async def _next(self, cid: str) -> ServerMessage:
        q = self._inbox[cid]
        wait_s = connect_wait(self.connect_timeout_s, self.timeout_s)
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        while q.empty() and not self._connected.is_set() and deadline is not None and not self._closed:
            left = deadline - loop.time()  # no server yet: wait for one, not forever (a failure, a close: in 0.1 s)
            if left <= 0:
                raise no_server(self.address, wait_s)
            try:
                await asyncio.wait_for(self._connected.wait(), min(left, 0.1))
            except asyncio.TimeoutError:
                pass
        if self.timeout_s is None:
            return await q.get()
        try:
            return await asyncio.wait_for(q.get(), self.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no reply from {self.address} within {self.timeout_s}s") from None

    async def _unary(self, req) -> Completion:
        cid = req.client_request_id
        self._inbox[cid] = asyncio.Queue()
        done = False
        try:
            await self._send(req)
            msg = await self._next(cid)
            done = True
            return expect(msg, Completion, "non-streamed")
        finally:
            del self._inbox[cid]
            if not done and not self._closed:
                await self._cancel_quietly(cid)

    async def _stream(self, req) -> AsyncIterator[Delta]:
        cid = req.client_request_id
        self._inbox[cid] = asyncio.Queue()
        done = False
        try:
            await self._send(req)
            while True:
                msg = await self._next(cid)
                if isinstance(msg, ErrorReply) or (isinstance(msg, Delta) and msg.finished):
                    done = True
                delta = expect(msg, Delta, "streamed")
                yield delta
                if done:
                    return
        finally:
            self._inbox.pop(cid, None)
            if not done and not self._closed:
                await self._cancel_quietly(cid)

    async def _cancel_quietly(self, cid: str) -> None:
        try:
            await self._sock.send(self._encoder.encode(CancelRequest(cid)))
        except Exception as e:  # best effort (the socket may be closing)
            logger.debug("cancel of %s not sent: %s", cid, e)


def connect_wait(connect_timeout_s: float | None, timeout_s: float | None) -> float | None:
    """How long a request waits for a connection to the server: the shorter of the two limits (None: forever)."""
    limits = [t for t in (connect_timeout_s, timeout_s) if t is not None]
    return min(limits) if limits else None

"""Clients of rapid.server.RapidServer: `Client` (blocking) and `AsyncClient` (asyncio, zmq.asyncio).

    with Client(address) as c:
        out = c.generate("The capital of France is", SamplingParams(max_tokens=16))  # -> Completion
        for d in c.stream("Once upon a time", SamplingParams(max_tokens=64)):      # -> Delta, ...
            print(d.new_text, end="")

    async with AsyncClient(address) as c:
        out = await c.generate("hello")
        async for d in c.stream("hello"):
            ...

A prompt is a str, a list of token ids or {'prompt_token_ids': [...]} (as LLM.generate takes); chat() and
chat_stream() take a list of {'role', 'content'} dicts. Requests the server refuses raise ServerError with
its message. Each client owns one DEALER socket: use a Client from one thread at a time (several requests
may still be interleaved: replies are sorted by request id), and an AsyncClient from one event loop
(any number of concurrent coroutines). Breaking out of a stream cancels the request on the server.
When the connection to the server closes (the server stopped or was killed), every request in flight raises
ServerError: the server has forgotten them (they used to wait forever, or until `timeout_s`).
A request whose encoding exceeds `max_message_bytes` (the server's default frame limit, 4 MiB) raises
ValueError before it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import zmq

from rapid.entrypoints.zmq_limits import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from rapid.entrypoints.zmq_monitor import close_monitored, open_disconnect_monitor
from rapid.params import SamplingParams
from rapid.protocol.api import (
    CancelRequest, ChatRequest, Completion, Delta, ErrorReply, GenerateRequest, ServerMessage,
)

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20  # the server's default ServerLimits.max_frame_bytes

__all__ = ["Client", "AsyncClient", "ServerError", "Completion", "Delta"]


def _decode_reply(decoder, raw: bytes, address: str):
    """A server message, or None when the frame is a liveness probe (empty) or malformed (logged)."""
    if not raw:
        return None
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        logger.warning("dropped a malformed reply from %s: %s", address, e)
        return None


def _unclaimed(msg) -> None:
    """A reply for no pending request: only errors are worth a log line."""
    if isinstance(msg, ErrorReply):
        logger.warning("server error not tied to a pending request: %s", msg.message)


class ServerError(RuntimeError):
    """The server refused or failed a request (its ErrorReply message)."""

    def __init__(self, message: str, client_request_id: str = ""):
        super().__init__(message)
        self.client_request_id = client_request_id


def _params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"params must be a SamplingParams or a dict of its fields, got {type(params).__name__}")


def _generate_request(cid: str, prompt: Any, params, stream: bool) -> GenerateRequest:
    p = _params(params)
    if isinstance(prompt, str):
        return GenerateRequest(cid, prompt=prompt, params=p, stream=stream)
    if isinstance(prompt, dict):
        if set(prompt) != {"prompt_token_ids"}:
            raise TypeError(f"a dict prompt takes the key 'prompt_token_ids', got keys {sorted(prompt)}")
        prompt = prompt["prompt_token_ids"]
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return GenerateRequest(cid, prompt_token_ids=list(prompt), params=p, stream=stream)
    raise TypeError("a prompt is a str, a list of token ids or {'prompt_token_ids': [...]}, "
                    f"got {type(prompt).__name__}")


def _chat_request(cid: str, messages: Any, params, stream: bool, add_generation_prompt: bool) -> ChatRequest:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return ChatRequest(cid, messages, params=_params(params), stream=stream,
                       add_generation_prompt=add_generation_prompt)


def _dealer(ctx: zmq.Context, address: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The DEALER, connected, and a socket that gets a message each time its connection to the server closes."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # streamed deltas are never dropped on this side either
    # a server that stops answering (its host gone, a partition, a stopped process) ends the connection as a close does
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    monitor = open_disconnect_monitor(sock)
    sock.connect(address)
    return sock, monitor


def _lost(cid: str, address: str) -> ErrorReply:
    """The end of a request in flight when the connection closed: the server (or its successor) forgot it."""
    return ErrorReply(cid, f"the connection to {address} closed (the server stopped or was killed) before this "
                           "request ended; send it again once the server is back")


def _encode(encoder, msg, limit: int) -> bytes:
    raw = encoder.encode(msg)
    if len(raw) > limit:
        raise ValueError(f"the request encodes to {len(raw)} bytes; the limit is {limit} (max_message_bytes, the "
                         "server's frame limit): shorten the prompt or the messages")
    return raw


def _expect(msg: ServerMessage, kind: type, request: str):
    """The reply as `kind` (Completion or Delta); an ErrorReply or another message raises ServerError."""
    if isinstance(msg, ErrorReply):
        raise ServerError(msg.message, msg.client_request_id)
    if not isinstance(msg, kind):
        raise ServerError(f"unexpected reply {type(msg).__name__} to a {request} request", msg.client_request_id)
    return msg


class Client:
    """Blocking client. `timeout_s`: longest wait for the next reply (None: forever) before TimeoutError."""

    def __init__(self, address: str, *, timeout_s: float | None = None, context: zmq.Context | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._sock, self._monitor = _dealer(context or zmq.Context.instance(), address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ServerMessage)
        self._ids = itertools.count()
        self._inbox: dict[str, deque[ServerMessage]] = {}
        self._closed = False

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
        return self._unary(_generate_request(self._new_id(), prompt, params, stream=False))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
             add_generation_prompt: bool = True) -> Completion:
        return self._unary(_chat_request(self._new_id(), messages, params, False, add_generation_prompt))

    def stream(self, prompt, params: SamplingParams | dict | None = None) -> Iterator[Delta]:
        """Deltas as they are produced; the last has finished=True. Sent when iteration starts."""
        return self._stream(_generate_request(self._new_id(), prompt, params, stream=True))

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                    add_generation_prompt: bool = True) -> Iterator[Delta]:
        return self._stream(_chat_request(self._new_id(), messages, params, True, add_generation_prompt))

    def cancel(self, client_request_id: str) -> None:
        """Abort a request; its stream still ends with a finished Delta (finish_reason 'abort')."""
        self._send(CancelRequest(client_request_id))

    # ------------------------------------------------------------------ plumbing
    def _new_id(self) -> str:
        return str(next(self._ids))

    def _send(self, msg) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._monitor.poll(0, zmq.POLLIN):  # a closed connection ends what was sent before it, not this request
            while self._poller.poll(0):
                self._receive()
        self._sock.send(_encode(self._encoder, msg, self.max_message_bytes))

    def _unary(self, req) -> Completion:
        cid = req.client_request_id
        self._inbox[cid] = deque()
        done = False
        try:
            self._send(req)
            msg = self._next(cid)
            done = True
            return _expect(msg, Completion, "non-streamed")
        finally:
            del self._inbox[cid]
            if not done and not self._closed:  # interrupted or timed out: free the engine
                self.cancel(cid)

    def _stream(self, req) -> Iterator[Delta]:
        cid = req.client_request_id
        self._inbox[cid] = deque()
        done = False
        try:
            self._send(req)
            while True:
                msg = self._next(cid)
                if isinstance(msg, ErrorReply) or (isinstance(msg, Delta) and msg.finished):
                    done = True
                delta = _expect(msg, Delta, "streamed")
                yield delta
                if done:
                    return
        finally:
            self._inbox.pop(cid, None)
            if not done and not self._closed:  # the caller stopped early: abort on the server
                self.cancel(cid)

    def _next(self, cid: str) -> ServerMessage:
        box = self._inbox[cid]
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
            msg = _decode_reply(self._decoder, self._sock.recv(), self.address)
            if msg is None:
                return
            other = self._inbox.get(msg.client_request_id)
            if other is not None:
                other.append(msg)
            else:
                _unclaimed(msg)
        elif self._monitor.poll(0, zmq.POLLIN):
            self._monitor.recv_multipart()
            for cid, box in self._inbox.items():
                box.append(_lost(cid, self.address))


class AsyncClient:
    """asyncio client (zmq.asyncio): `await generate(...)`, `async for d in stream(...)`; concurrent use is fine."""

    def __init__(self, address: str, *, timeout_s: float | None = None, context=None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        import zmq.asyncio

        self.address = address
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._sock, self._monitor = _dealer(context or zmq.asyncio.Context.instance(), address)
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
        return await self._unary(_generate_request(self._new_id(), prompt, params, stream=False))

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                   add_generation_prompt: bool = True) -> Completion:
        return await self._unary(_chat_request(self._new_id(), messages, params, False, add_generation_prompt))

    def stream(self, prompt, params: SamplingParams | dict | None = None) -> AsyncIterator[Delta]:
        return self._stream(_generate_request(self._new_id(), prompt, params, stream=True))

    def chat_stream(self, messages: list[dict[str, str]], params: SamplingParams | dict | None = None, *,
                    add_generation_prompt: bool = True) -> AsyncIterator[Delta]:
        return self._stream(_chat_request(self._new_id(), messages, params, True, add_generation_prompt))

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
        await self._sock.send(_encode(self._encoder, msg, self.max_message_bytes))

    async def _read_loop(self) -> None:
        poller = zmq.asyncio.Poller()  # (zmq.asyncio imported by __init__)
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                if self._sock not in ready:  # the connection closed (the replies it brought were read first)
                    await self._monitor.recv_multipart()
                    for cid, q in self._inbox.items():
                        q.put_nowait(_lost(cid, self.address))
                    continue
                msg = _decode_reply(self._decoder, await self._sock.recv(), self.address)
                if msg is None:
                    continue
                q = self._inbox.get(msg.client_request_id)
                if q is not None:
                    q.put_nowait(msg)
                else:
                    _unclaimed(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the socket failed: wake every waiter with an error
            for cid, q in self._inbox.items():
                q.put_nowait(ErrorReply(cid, f"client receive failed: {e}"))
            raise

    async def _next(self, cid: str) -> ServerMessage:
        q = self._inbox[cid]
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
            return _expect(msg, Completion, "non-streamed")
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
                delta = _expect(msg, Delta, "streamed")
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

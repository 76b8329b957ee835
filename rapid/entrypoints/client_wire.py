"""What rapid.client's Client and AsyncClient share: their errors, the request messages they build, the DEALER socket
and its connection monitor, and how replies are read. No torch.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from rapid.entrypoints.zmq_limits import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from rapid.entrypoints.zmq_monitor import open_disconnect_monitor
from rapid.params import SamplingParams
from rapid.protocol.api import ChatRequest, ErrorReply, GenerateRequest, ServerMessage

logger = logging.getLogger("rapid.entrypoints.client")

CONNECT_TIMEOUT_S = 5.0  # how long a request waits for a connection to the server (its ZeroMQ handshake)


def decode_reply(decoder, raw: bytes, address: str):
    """A server message, or None when the frame is a liveness probe (empty) or malformed (logged)."""
    if not raw:
        return None
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        logger.warning("dropped a malformed reply from %s: %s", address, e)
        return None


def unclaimed(msg) -> None:
    """A reply for no pending request: only errors are worth a log line."""
    if isinstance(msg, ErrorReply):
        logger.warning("server error not tied to a pending request: %s", msg.message)


class ServerError(RuntimeError):
    """The server refused or failed a request (its ErrorReply message)."""

    def __init__(self, message: str, client_request_id: str = ""):
        super().__init__(message)
        self.client_request_id = client_request_id


class NoServerError(ServerError, ConnectionError):
    """No server answered at the client's address in time: nothing listens there (or no RapidServer does)."""


def no_server(address: str, waited_s: float) -> NoServerError:
    return NoServerError(f"no server answered at {address} within {waited_s:g}s (no ZeroMQ handshake): nothing "
                         "listens there, or not a RapidServer. Start one (`rapid serve`; it prints its ZeroMQ "
                         "address), check the address, or pass connect_timeout_s=None to wait for a server")


def sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"params must be a SamplingParams or a dict of its fields, got {type(params).__name__}")


def generate_request(cid: str, prompt: Any, params, stream: bool) -> GenerateRequest:
    p = sampling_params(params)
    if isinstance(prompt, str):
        return GenerateRequest(cid, prompt=prompt, params=p, stream=stream)
    if isinstance(prompt, dict):  # LLM.generate's TextPrompt / TokensPrompt
        if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            return GenerateRequest(cid, prompt=prompt["prompt"], params=p, stream=stream)
        if set(prompt) != {"prompt_token_ids"}:
            raise TypeError("a dict prompt takes the key 'prompt' (text) or 'prompt_token_ids', got keys "
                            f"{sorted(prompt)}")
        prompt = prompt["prompt_token_ids"]
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return GenerateRequest(cid, prompt_token_ids=list(prompt), params=p, stream=stream)
    raise TypeError("a prompt is a str, a list of token ids, {'prompt': str} or {'prompt_token_ids': [...]}, "
                    f"got {type(prompt).__name__}")


def chat_request(cid: str, messages: Any, params, stream: bool, add_generation_prompt: bool) -> ChatRequest:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return ChatRequest(cid, messages, params=sampling_params(params), stream=stream,
                       add_generation_prompt=add_generation_prompt)


def dealer(ctx: zmq.Context, address: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The DEALER, connected, and a socket that gets a message each time a connection to the server opens (ZeroMQ's
    handshake done) or closes (read with `connection_event`)."""
    if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
        raise ValueError(f"address {address!r}: a RAPID server listens on ipc://<path> or tcp://<host>:<port> (what "
                         "`rapid serve` prints at start)")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # streamed deltas are never dropped on this side either
    # a server that stops answering (its host gone, a partition, a stopped process) ends the connection as a close does
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    monitor = open_disconnect_monitor(sock, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(address)
    return sock, monitor


def connection_event(frames: list[bytes]) -> bool:
    """A monitor message of `dealer`'s: True when a connection opened, False when one closed."""
    return parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


def lost(cid: str, address: str) -> ErrorReply:
    """The end of a request in flight when the connection closed: the server (or its successor) forgot it."""
    return ErrorReply(cid, f"the connection to {address} closed (the server stopped or was killed) before this "
                           "request ended; send it again once the server is back")


def encode(encoder, msg, limit: int) -> bytes:
    raw = encoder.encode(msg)
    if len(raw) > limit:
        raise ValueError(f"the request encodes to {len(raw)} bytes; the limit is {limit} (max_message_bytes, the "
                         "server's frame limit): shorten the prompt or the messages")
    return raw


def expect(msg: ServerMessage, kind: type, request: str):
    """The reply as `kind` (Completion or Delta); an ErrorReply or another message raises ServerError."""
    if isinstance(msg, ErrorReply):
        raise ServerError(msg.message, msg.client_request_id)
    if not isinstance(msg, kind):
        raise ServerError(f"unexpected reply {type(msg).__name__} to a {request} request", msg.client_request_id)
    return msg

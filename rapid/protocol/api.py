"""The public wire format between rapid.client (Client, AsyncClient) and rapid.server.RapidServer.

msgspec Structs, one msgpack frame per message; no torch, no pickle.
"""

from __future__ import annotations

import msgspec

from rapid.params import SamplingParams

# What rapid.client.Client / AsyncClient (a DEALER socket) exchange with rapid.server.RapidServer (a ROUTER
# socket): one msgpack frame per message, tagged by class name ("type" field). Requests carry an id chosen
# by the client; every reply names it. A request ends with a Completion, a Delta with finished=True
# (stream=True) or an ErrorReply. Decoding validates the SamplingParams again (msgspec runs __post_init__).
# Requests refuse unknown fields (a misspelt `max_token` is an error, in the params too: the server decodes
# them strictly); replies accept them, so an older client keeps reading a newer server. An empty frame from the
# server is a liveness probe: ignore it. The server's bounds (frame size, prompt length, requests per client)
# are in rapid.entrypoints.zmq_limits and docs/reliability.md.


class GenerateRequest(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """A text prompt or a token-id prompt (exactly one of the two)."""

    client_request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False


class ChatRequest(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """One conversation through the model's chat template."""

    client_request_id: str
    messages: list[dict[str, str]]
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    add_generation_prompt: bool = True


class CancelRequest(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Abort a request of this client; it still ends with its final Delta / Completion (finish_reason 'abort')."""

    client_request_id: str


class Delta(msgspec.Struct, tag=True):
    """New output of a streamed request since its previous Delta (the last one has finished=True)."""

    client_request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None  # with logprobs only (as Completion's)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class Completion(msgspec.Struct, tag=True):
    """The whole result of a non-streamed request."""

    client_request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None


class ErrorReply(msgspec.Struct, tag=True):
    """The request was refused or failed. client_request_id is '' when the message could not be read."""

    client_request_id: str
    message: str


ClientMessage = GenerateRequest | ChatRequest | CancelRequest
ServerMessage = Delta | Completion | ErrorReply

"""Reading client messages on the server: cheap envelopes, strict bounded decoding, prompts checked before work.

`Envelope.read(raw)` learns a frame's type and client_request_id by skipping everything else (msgspec builds
nothing for skipped fields), so an invalid or oversized frame costs a scan, not a decode. `RequestReader.decode`
then decodes a request with the api Structs' fields under the server's bounds: unknown fields are refused (in
the SamplingParams too), a token-id list longer than max_model_len or a text longer than the character bound
fails on its length header, before its elements are read. `RequestReader.prompt_ids` applies the LLM's own
checks (LLM.validate / chat_prompt_ids) to what passed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional

import msgspec

from rapid.entrypoints.llm_inputs import server_chat_messages
from rapid.entrypoints.zmq_limits import MAX_CHAT_KEY_CHARS, MAX_CHAT_KEYS, MAX_REQUEST_ID_CHARS, ServerLimits
from rapid.params import SamplingParams
from rapid.protocol.api import CancelRequest, ChatRequest, GenerateRequest

REQUEST_TYPES = ("GenerateRequest", "ChatRequest")
MESSAGE_TYPES = REQUEST_TYPES + ("CancelRequest",)
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


class RequestError(ValueError):
    """A message the server refuses; str() is the text of the ErrorReply."""


class Envelope(msgspec.Struct):
    """The fields the server needs before deciding what to do with a frame (the others are skipped)."""

    type: str = ""
    client_request_id: str = ""
    stream: bool = False

    @staticmethod
    def read(raw: bytes | memoryview) -> tuple["Envelope | None", str, str | None]:
        """(envelope, client_request_id, None), or (None, the id if it can be read else '', error to answer)."""
        try:
            env = _ENVELOPE.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            try:
                cid = _ID_ONLY.decode(raw).client_request_id
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                cid = ""
            return None, cid, f"malformed message: {e}"
        if env.type not in MESSAGE_TYPES:
            what = f"unknown message type {env.type!r}" if env.type else "missing field 'type'"
            return None, env.client_request_id, f"malformed message: {what}; expected one of {', '.join(MESSAGE_TYPES)}"
        return env, env.client_request_id, None


class _IdOnly(msgspec.Struct):
    client_request_id: str = ""


_ID_ONLY = msgspec.msgpack.Decoder(_IdOnly)
_ENVELOPE = msgspec.msgpack.Decoder(Envelope)


class _StrictParams(SamplingParams, forbid_unknown_fields=True):
    """SamplingParams decoded from the wire: a misspelt field is an error, not a silent default."""


def _strict(api_type: type, overrides: dict[str, Any]) -> type:
    """A tagged Struct with api_type's name, fields and defaults, the types in `overrides`, unknown fields refused."""
    fields = []
    for f in msgspec.structs.fields(api_type):
        if f.default is not msgspec.NODEFAULT:
            default = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=_StrictParams if f.name == "params" else f.default_factory)
        else:
            fields.append((f.name, overrides.get(f.name, f.type)))
            continue
        fields.append((f.name, overrides.get(f.name, f.type), default))
    return msgspec.defstruct(api_type.__name__, fields, tag=True, forbid_unknown_fields=True)


class RequestReader:
    """Decode and check the requests of one server (bounds from its LLM's max_model_len and its ServerLimits)."""

    def __init__(self, llm, limits: ServerLimits):
        self.llm = llm
        self.max_model_len: int = llm.config.scheduler.max_model_len
        self.max_chars = limits.max_prompt_chars(self.max_model_len)
        self.limits = limits
        text = Annotated[str, msgspec.Meta(max_length=self.max_chars)]
        ids = Annotated[list[int], msgspec.Meta(max_length=self.max_model_len)]
        key = Annotated[str, msgspec.Meta(max_length=MAX_CHAT_KEY_CHARS)]
        message = Annotated[dict[key, text], msgspec.Meta(max_length=MAX_CHAT_KEYS)]
        messages = Annotated[list[message], msgspec.Meta(max_length=limits.max_chat_messages)]
        rid = {"client_request_id": Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID_CHARS)]}
        generate = _strict(GenerateRequest, {"prompt": Optional[text], "prompt_token_ids": Optional[ids],
                                             "params": _StrictParams, **rid})
        chat = _strict(ChatRequest, {"messages": messages, "params": _StrictParams, **rid})
        self.cancel_type = _strict(CancelRequest, rid)
        self.chat_type = chat
        self._decoder = msgspec.msgpack.Decoder(generate | chat | self.cancel_type)

    def decode(self, raw: bytes | memoryview):
        """A request Struct (fields as in rapid.protocol.api, params a plain SamplingParams), or RequestError."""
        try:
            msg = self._decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
            # a well-formed request with a bad field (a ValidationError) is invalid, not malformed
            raise RequestError(self._explain(str(e), "invalid request" if isinstance(e, msgspec.ValidationError)
                                             else "malformed message")) from None
        params = getattr(msg, "params", None)
        if params is not None:
            msgspec.structs.force_setattr(msg, "params", SamplingParams(**msgspec.structs.asdict(params)))
        return msg

    def _explain(self, error: str, kind: str) -> str:
        """msgspec's message after `kind`, with the bounds behind a length error spelt out."""
        m = _PATH.search(error)
        path = m.group(1) if m else ""
        if "length <=" not in error:
            return f"{kind}: {error}"
        if path == "client_request_id":  # it comes back in every reply of the request
            return f"client_request_id is longer than {MAX_REQUEST_ID_CHARS} characters"
        if path == "prompt_token_ids":
            return (f"prompt has more than {self.max_model_len} tokens; max_model_len is {self.max_model_len} "
                    "(prompt + max_tokens must fit)")
        if path == "prompt" or (path.startswith("messages[") and path.count("[") == 2):
            return (f"text of more than {self.max_chars} characters refused before tokenization (max_model_len "
                    f"{self.max_model_len} x {self.limits.max_chars_per_token} characters per token)")
        if path == "messages":
            return f"a chat takes at most {self.limits.max_chat_messages} messages"
        if path.startswith("messages["):
            return (f"a chat message has at most {MAX_CHAT_KEYS} keys of at most {MAX_CHAT_KEY_CHARS} "
                    f"characters ({error})")
        return f"{kind}: {error}"

    def prepare(self, msg):
        """(prompt text, token ids, the params the engine runs) after the LLM's checks (LLM.prepare);
        ValueError / TypeError with its message."""
        params = msg.params
        if params.n != 1:
            raise ValueError("the server takes n=1; send n requests (with distinct seeds) instead")
        if params.prompt_logprobs is not None:  # Completion and Delta carry no prompt logprobs (HTTP refuses it too)
            raise ValueError("prompt_logprobs is not returned over ZeroMQ; use LLM.generate for prompt logprobs")
        llm = self.llm
        if isinstance(msg, self.chat_type):
            if not msg.messages:
                raise ValueError("messages is empty")
            chars = sum(len(k) + len(v) for m in msg.messages for k, v in m.items())
            if chars > self.max_chars:
                raise ValueError(f"the chat's messages hold {chars} characters; at most {self.max_chars} "
                                 f"(max_model_len {self.max_model_len} x {self.limits.max_chars_per_token} "
                                 "characters per token) are tokenized")
            ids = llm.chat_prompt_ids(server_chat_messages(msg.messages), msg.add_generation_prompt)
            _, ids, params = llm.prepare({"prompt_token_ids": ids}, params)
            return llm.tokenizer.decode(ids), ids, params
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        prompt: Any = msg.prompt if msg.prompt is not None else {"prompt_token_ids": msg.prompt_token_ids}
        return llm.prepare(prompt, params)


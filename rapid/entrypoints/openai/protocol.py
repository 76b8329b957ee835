"""OpenAI request bodies (msgspec Structs with OpenAI's field names) and their conversion to SamplingParams.

Everything here is plain Python: a bad body becomes `ApiError` (status 400 and OpenAI's error shape)
before anything reaches the engine. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from rapid.entrypoints.llm_inputs import chat_role
from rapid.params import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # choices per request (each one is an engine request): OpenAI's own limit; vLLM has none
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(msgspec.Struct):  # other keys ignored (OpenAI's include_obfuscation, say), as vLLM does
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchema(msgspec.Struct, rename={"schema_": "schema"}):
    name: str
    schema_: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: JsonSchema | None = None


class _Sampling(msgspec.Struct, kw_only=True):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    return_token_ids: bool = False  # vLLM's: each choice (each streamed chunk) also carries its token ids
    # structured outputs, vLLM's way (besides response_format): one of these
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM fields this server does not implement: refused when set, never silently ignored
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    priority: int = 0
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_Sampling, kw_only=True):
    # OpenAI's and vLLM's default when the field is absent is 16 tokens; an explicit null means the model's default
    # (generation_config.json's max_new_tokens), else the room max_model_len leaves
    max_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked in prompts()
    logprobs: int | bool | None = None  # true: 1 (vLLM's pydantic reads it so), false: none
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.logprobs, bool):
            self.logprobs = 1 if self.logprobs else None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls, for templates that render them
    tool_call_id: str | None = None  # a tool message's answer to one of them


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    # how the messages go through the chat template (vLLM's fields; TokenizeRequest has the same: msgspec Structs
    # cannot share them through a second base)
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize (vLLM's): a prompt, or messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False  # also the tokenizer's string of each token (vLLM's token_strs)


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[int]


SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                   "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                   "skip_special_tokens", "bad_words", "allowed_token_ids", "truncate_prompt_tokens")
PARAM_NAMES = set(SAMPLING_FIELDS) | {"n", "max_tokens", "stop", "logprobs", "logit_bias"}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
UNSUPPORTED = {  # field -> (the value that means "off", why)
    "prompt_logprobs": (None, "prompt_logprobs are not returned by this server (use LLM.generate)"),
    "use_beam_search": (False, "beam search is not supported"),
    "priority": (0, "priority scheduling is not supported"),
    "return_tokens_as_token_ids": (False, "return_tokens_as_token_ids is not supported; use return_token_ids"),
    "echo": (False, "echo is not supported by this server"),
}


def refuse_unsupported(req: msgspec.Struct) -> None:
    """ApiError 400 for a vLLM field this server does not implement, set to anything but its off value."""
    for name, (off, why) in UNSUPPORTED.items():
        if getattr(req, name, off) != off:
            raise ApiError(400, why, param=name)


def decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """The request Struct, or ApiError 400 naming the bad field (from msgspec's '... - at `$.field`')."""
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        req = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        found = re.search(r"at `\$\.([A-Za-z_]+)", str(e))
        raise ApiError(400, f"invalid request: {e}", param=found.group(1) if found else None) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec decodes nested arrays and objects recursively
        raise ApiError(400, "the request body nests arrays or objects too deeply to decode") from None
    if isinstance(req, _Sampling):
        _check_common(req)
    return req


def _check_common(req: _Sampling) -> None:
    if not 1 <= req.n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    if req.logit_bias and "logit_bias" not in SamplingParams.__struct_fields__:
        raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.response_format is not None:
        check_response_format(req.response_format)


def check_response_format(fmt: ResponseFormat) -> None:
    """Accept OpenAI's shapes; anything but plain text needs structured output in the engine."""
    if fmt.type not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}",
                       param="response_format")
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format of type 'json_schema' needs a 'json_schema' object with 'name' "
                           "and 'schema'", param="response_format")
        if not SCHEMA_NAME.match(fmt.json_schema.name):
            raise ApiError(400, f"response_format.json_schema.name must match [A-Za-z0-9_-]{{1,64}}, got "
                           f"{fmt.json_schema.name!r}", param="response_format")
    if fmt.type != "text" and "structured_outputs" not in SamplingParams.__struct_fields__:
        raise ApiError(400, f"response_format type {fmt.type!r} (structured output) is not supported by this server "
                       "yet; use type 'text'", param="response_format")


def _format_constraint(fmt: ResponseFormat) -> dict[str, Any]:
    """response_format (json_object or json_schema) as StructuredOutputsParams' fields."""
    return {"json_object": True} if fmt.type == "json_object" else {"json": fmt.json_schema.schema_ or {}}


def structured_output(req: _Sampling):
    """The engine's StructuredOutputsParams from response_format, structured_outputs or vLLM's older guided_*
    fields (at most one of them; None for plain text)."""
    from rapid.params import STRUCTURED_CONSTRAINTS, StructuredOutputsParams

    given = _structured_fields(req)
    options = given.get("structured_outputs")
    if "response_format" in given and isinstance(options, dict) and not set(options) & set(STRUCTURED_CONSTRAINTS):
        # vLLM merges response_format into a structured_outputs that only sets options (disable_any_whitespace)
        given["structured_outputs"] = _format_constraint(given.pop("response_format")) | options
    if len(given) > 1:
        raise ApiError(400, f"give one structured-output constraint, got {sorted(given)}", param=sorted(given)[1])
    if not given:
        return None
    (name, value), = given.items()
    try:
        if name == "response_format":
            return StructuredOutputsParams(**_format_constraint(value))
        if name == "structured_outputs":
            unknown = sorted(set(value) - set(StructuredOutputsParams.__struct_fields__))
            if unknown:  # vLLM's structural_tag, whitespace_pattern, ...: refused, as LLM.generate does
                raise ValueError(f"structured_outputs.{unknown[0]} is not supported by this server")
            return msgspec.convert(value, StructuredOutputsParams)
        return StructuredOutputsParams(**{GUIDED[name]: value})
    except (ValueError, TypeError, msgspec.ValidationError) as e:
        raise ApiError(400, f"{name}: {e}", param=name) from None


def _structured_fields(req: _Sampling) -> dict[str, Any]:
    """The structured-output fields the request sets: {name: value}."""
    given = {name: getattr(req, name) for name in ("structured_outputs", *GUIDED) if getattr(req, name) is not None}
    if req.response_format is not None and req.response_format.type != "text":
        given["response_format"] = req.response_format
    return given


def prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: a str, a list of str, token ids or a list of token-id lists."""
    p = req.prompt
    if req.suffix:
        raise ApiError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of must equal n ({req.n}) on this server, got {req.best_of}", param="best_of")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_int(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return [list(x) for x in p]
    raise ApiError(400, "prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
                   f"token-id lists, got {_describe(p)}", param="prompt")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as {'role', 'content'} dicts for the chat template (text parts joined; a message's name,
    tool_calls and tool_call_id passed on when given)."""
    if not req.messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if req.tools:
        raise ApiError(400, "tools are not supported by this server", param="tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, f"tool_choice {req.tool_choice!r} needs tools, which this server does not support",
                       param="tool_choice")
    out = []
    for i, m in enumerate(req.messages):
        try:
            role = chat_role(i, m.role, m.content, m.tool_calls)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text" or p.text is None]
            if bad:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got type {bad[0]!r}",
                               param="messages")
            content = "\n".join(p.text for p in content)  # as vLLM joins text parts
        message = {"role": role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):  # to the template as given, as vLLM
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        out.append(message)
    return out


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:  # chat names it top_logprobs
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                       param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def sampling_params(req: _Sampling, *, max_tokens: int | None, logprobs: int | None, default_max_tokens: int,
                    index: int = 0, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The engine's params for choice `index` (n=1, seed + index when seeded), or ApiError 400. `defaults`: the
    model's sampling defaults (LLM.default_sampling_params), for the fields the request leaves out."""
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    fields: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k in SAMPLING_FIELDS}
    fields |= {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    if req.seed is not None:  # -1: unseeded, as vLLM (seed + index would seed every choice but the first)
        fields["seed"] = None if req.seed == -1 else req.seed + index
    fields["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if req.stop is not None:
        fields["stop"] = req.stop
    if req.logit_bias:
        fields["logit_bias"] = req.logit_bias
    if logprobs is not None:
        fields["logprobs"] = logprobs
    refuse_unsupported(req)
    guided = structured_output(req)
    if guided is not None:
        fields["structured_outputs"] = guided
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as e:
        raise field_error(e, req) from None


def field_error(error: Exception, req: _Sampling, default: str | None = None) -> ApiError:
    """A 400 for an engine-side error, naming the request field it concerns as the request spelled it (chat's
    max_completion_tokens is the engine's max_tokens)."""
    param, message = param_of(error, default, req), str(error)
    if param == "max_tokens" and getattr(req, "max_completion_tokens", None) is not None:
        param, message = "max_completion_tokens", re.sub(r"\bmax_tokens\b", "max_completion_tokens", message)
    return ApiError(400, message, param=param)


def param_of(error: Exception, default: str | None = None, req: _Sampling | None = None) -> str | None:
    """The request field an engine-side error names ('logit_bias has token id ...' -> logit_bias), else default;
    a structured-output error names the field `req` gave it in (guided_regex, structured_outputs, ...)."""
    word = str(error).split(" ", 1)[0].split(".", 1)[0]
    if word == "structured_outputs":
        return next(iter(_structured_fields(req)), "response_format") if req is not None else "response_format"
    return word if word in PARAM_NAMES else default


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(x: Any) -> str:
    return "an empty list" if x == [] else "nothing" if x is None else f"{type(x).__name__} {str(x)[:40]!r}"

"""LLM's edge checks for one request: prompt shapes (str, TextPrompt, TokensPrompt), sampling params given as a
dict, and the params that need the tokenizer or the model (bad_words, token ids in range, max_tokens=None,
truncate_prompt_tokens, structured outputs), as vLLM prepares them before the engine sees them."""

from __future__ import annotations

from typing import Any

import msgspec

from rapid.params import SamplingParams


def to_sampling_params(p: Any) -> SamplingParams:
    """A SamplingParams, or a dict of its fields (TypeError naming an unknown field, ValueError a bad value)."""
    if isinstance(p, SamplingParams):
        return p
    if isinstance(p, dict):
        unknown = sorted(set(p) - set(SamplingParams.__struct_fields__))
        if unknown:
            raise TypeError(f"sampling_params has unknown field(s) {unknown}; the fields are SamplingParams'")
        return SamplingParams(**p)
    raise TypeError(f"sampling_params must be a SamplingParams or a dict of its fields, got {type(p).__name__}")


def parse_prompt(prompt: Any, tokenizer) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a str, {'prompt': str} (TextPrompt) or {'prompt_token_ids': [...]} (TokensPrompt)."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt_token_ids", "prompt"}
        if unknown or not ({"prompt_token_ids", "prompt"} & set(prompt)):
            raise TypeError("a dict prompt is {'prompt': str} (TextPrompt) or {'prompt_token_ids': [ints]} "
                            f"(TokensPrompt), got keys {sorted(prompt)}")
        if "prompt_token_ids" not in prompt:
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        else:
            ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError("prompt_token_ids must be a list of ints")
            return text, list(ids)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (skip_tokenizer_init=True was given)")
        check_text(prompt, "prompt")
        return prompt, list(tokenizer.encode(prompt))
    raise TypeError("a prompt is a str, {'prompt': str} or {'prompt_token_ids': [...]}, got "
                    f"{type(prompt).__name__}")


def check_text(text: str, what: str) -> None:
    """ValueError naming `what` when text cannot be UTF-8 (a lone surrogate such as '\\ud800'), which a tokenizer
    would refuse with a TypeError about its input types."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: {e.reason} at character {e.start}") from None


def check_truncation(params: SamplingParams, max_model_len: int) -> None:
    """vLLM's rule: truncate_prompt_tokens past max_model_len is a ValueError (no prompt that long could run)."""
    k = params.truncate_prompt_tokens
    if k is not None and k > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len ({max_model_len}); "
                         "choose a smaller truncation size")


def bad_words_token_ids(words: tuple[str, ...], tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule: each word encoded without special tokens, and with a leading space when that gives
    another first token of the same length (to ban the word at the start and inside the text)."""
    out: list[list[int]] = []
    for word in words:
        for prefix_space in (False, True):
            ids = tokenizer.encode((" " if prefix_space else "") + word.lstrip(), add_special_tokens=False)
            if not ids:
                continue
            if not prefix_space or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return tuple(tuple(ids) for ids in out)


def prepare_params(params: SamplingParams, num_prompt_tokens: int, *, tokenizer, vocab_size: int,
                   max_model_len: int) -> SamplingParams:
    """The params the engine runs: token ids checked against the vocabulary, max_tokens=None resolved to the
    room left in max_model_len, bad_words tokenized, structured outputs parsed (ValueError naming the field)."""
    for name, ids in (("allowed_token_ids", params.allowed_token_ids or ()), ("logit_bias", params.logit_bias or {})):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
    changes: dict[str, Any] = {}
    if params.max_tokens is None:
        changes["max_tokens"] = max(max_model_len - num_prompt_tokens, 1)
        if params.min_tokens > changes["max_tokens"]:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the room left in max_model_len "
                             f"({changes['max_tokens']} tokens after the prompt)")
    if params.bad_words and params.bad_words_token_ids is None:
        if tokenizer is None:
            raise ValueError("bad_words needs a tokenizer (skip_tokenizer_init=True was given)")
        changes["bad_words_token_ids"] = bad_words_token_ids(params.bad_words, tokenizer)
    if params.structured_outputs is not None:
        if tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer (skip_tokenizer_init=True was given)")
        from rapid.worker.grammar import check_structured_outputs

        check_structured_outputs(params.structured_outputs)
    return msgspec.structs.replace(params, **changes) if changes else params


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # what the servers accept (OpenAI's roles)


def chat_role(index: int, role: object, content: object, tool_calls: object = None) -> str:
    """The chat template's role for a server's message `index` (both servers take CHAT_ROLES; 'developer' is
    'system'); ValueError naming the message otherwise, or when it has no content, which OpenAI allows only to an
    assistant message with tool calls (vLLM reads a missing content as empty)."""
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{index}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
    if content is None and not (role == "assistant" and tool_calls is not None):
        needs = "unless it has tool_calls" if role == "assistant" else f"for role {role!r}"
        raise ValueError(f"messages[{index}].content is required {needs}")
    return "system" if role == "developer" else role


def server_chat_messages(messages: list[dict]) -> list[dict]:
    """A server's chat messages with their roles and contents checked and roles mapped (chat_role)."""
    return [{**m, "role": chat_role(i, m.get("role"), m.get("content"), m.get("tool_calls"))}
            for i, m in enumerate(messages)]


def text_parts_joined(conversation: list[dict]) -> list[dict]:
    """The conversation with OpenAI content-part lists ([{"type": "text", "text": ...}, ...]) as the chat template's
    string, parts joined by newlines (as vLLM does); ValueError for a part that is not text."""
    out = []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content: only text parts are supported, got type {kind!r}")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out

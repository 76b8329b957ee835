"""OpenAI response bodies: choices, streamed chunks, logprobs and usage (plain dicts, ready for JSON)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class ChoiceState:
    """What one choice (one engine request) has produced so far."""

    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it (None: EOS or length)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Builder:
    """Bodies of one response (one id, model and creation time); `chat` picks the chat or completion shape."""

    def __init__(self, request_id: str, model: str, chat: bool, tokenizer, top_logprobs: int | None,
                 return_token_ids: bool = False):
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs  # None: no logprobs asked
        self.return_token_ids = return_token_ids  # vLLM's: choices carry token_ids (and the prompt's, once)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _token(self, tid: int) -> str:
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else str(tid)

    def logprobs(self, entries: list[tuple[int, dict[int, float]]], text_offset: int = 0) -> dict | None:
        if self.top_logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(tid, lps) for tid, lps in entries]}
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lps in entries:
            tok = self._token(tid)
            tokens.append(tok)
            token_lps.append(lps.get(tid))
            # the top `logprobs` and always the sampled token (OpenAI: up to logprobs + 1 entries; vLLM)
            tops.append({self._token(t): lp for t, lp in self._top(lps) + [(tid, lps[tid])] * (tid in lps)})
            offsets.append(text_offset)
            text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _top(self, lps: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(lps.items(), key=lambda kv: -kv[1])[: self.top_logprobs]

    def _chat_entry(self, tid: int, lps: dict[int, float]) -> dict:
        tok = self._token(tid)
        return {"token": tok, "logprob": lps.get(tid), "bytes": list(tok.encode("utf-8")),
                "top_logprobs": [{"token": (t := self._token(i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                 for i, lp in self._top(lps)]}

    # ------------------------------------------------------------------ whole responses
    def response(self, choices: list[ChoiceState], prompt_tokens: int, prompts: dict[int, list[int]] | None = None
                 ) -> dict:
        """`prompts`: each choice's prompt token ids, by choice index (for return_token_ids)."""
        body = self._head("chat.completion" if self.chat else "text_completion")
        body["choices"] = [self._choice(c) for c in sorted(choices, key=lambda c: c.index)]
        if self.return_token_ids:  # as vLLM: chat has one prompt, at the top; a completion's choices each have theirs
            for choice, c in zip(body["choices"], sorted(choices, key=lambda c: c.index)):
                choice["token_ids"] = list(c.token_ids)
                if not self.chat:
                    choice["prompt_token_ids"] = list((prompts or {}).get(c.index, []))
            if self.chat:
                body["prompt_token_ids"] = list(next(iter((prompts or {}).values()), []))
        body["usage"] = usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
        return body

    def _choice(self, c: ChoiceState) -> dict:
        lp = self.logprobs(c.logprobs)
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    # ------------------------------------------------------------------ streamed chunks
    def chunk(self, index: int, text: str, entries, finish_reason: str | None, *, first: bool = False,
              stop_reason: int | str | None = None, text_offset: int = 0, include_usage: bool = False,
              token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None) -> dict:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        lp = self.logprobs(entries, text_offset) if entries else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        choice["stop_reason"] = stop_reason
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids or [])
            if prompt_token_ids is not None:  # the choice's first chunk (chat: at the top, as vLLM)
                (body if self.chat else choice)["prompt_token_ids"] = list(prompt_token_ids)
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

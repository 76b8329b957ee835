"""LLM's outputs from the engine's RequestDeltas: text, token ids, metrics, and logprobs as vLLM's Logprob
(logprob, rank, decoded_token); the engine's wire format stays compact ({token: logprob} + the chosen rank)."""

from __future__ import annotations

from collections.abc import Sequence

from rapid.outputs import CompletionOutput, Logprob, RequestOutput
from rapid.protocol.engine import RequestDelta


class LogprobConverter:
    """{token: logprob} dicts (top-N in rank order, then the chosen token) -> {token: Logprob}, the chosen token
    first as in vLLM (scripts read `next(iter(entries))` as the sampled token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def decoded(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def convert(self, entries: Sequence[dict[int, float]], chosen: Sequence[int], ranks: Sequence[int] | None
                ) -> list[dict[int, Logprob]]:
        out = []
        for i, (d, tok) in enumerate(zip(entries, chosen)):
            rank = ranks[i] if ranks is not None and i < len(ranks) else None
            entry = {t: Logprob(lp, (rank or None) if t == tok else pos, self.decoded(t))
                     for pos, (t, lp) in enumerate(d.items(), start=1)}
            if tok in entry:  # vLLM's order: the chosen (sampled or prompt) token first, then the top-N
                entry = {tok: entry.pop(tok), **entry}
            out.append(entry)
        return out


def apply_delta(out: RequestOutput, comp: CompletionOutput, d: RequestDelta, logprobs: LogprobConverter) -> None:
    comp.text += d.new_text
    comp.token_ids.extend(d.new_token_ids)
    if d.new_logprobs is not None:
        if comp.logprobs is None:
            comp.logprobs = []
        comp.logprobs.extend(logprobs.convert(d.new_logprobs, d.new_token_ids, d.new_logprob_ranks))
        comp.cumulative_logprob = d.cumulative_logprob
    if d.prompt_logprobs is not None and out.prompt_logprobs is None:
        out.prompt_logprobs = [None] + logprobs.convert(d.prompt_logprobs, out.prompt_token_ids[1:],
                                                        d.prompt_logprob_ranks)
    if d.finished:
        comp.finish_reason, comp.stop_reason = d.finish_reason, d.stop_reason
    out.num_cached_tokens = max(out.num_cached_tokens, d.num_cached_tokens)
    m = out.metrics
    m.arrival_time = d.arrival_time or m.arrival_time
    if d.first_token_time is not None and (m.first_token_time is None or d.first_token_time < m.first_token_time):
        m.first_token_time = d.first_token_time
    if d.last_token_time is not None:
        m.last_token_time = max(m.last_token_time or 0.0, d.last_token_time)

"""Turns sampled tokens into RequestDeltas: incremental detokenisation, stop strings, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from rapid.core.detokenizer import IncrementalDetokenizer
from rapid.protocol.engine import RequestDelta
from rapid.protocol.worker import SampledToken
from rapid.core.request import Request


@dataclass
class _RequestText:
    detok: IncrementalDetokenizer | None  # None without a tokenizer (token ids only)
    cumulative_logprob: float = 0.0
    pending_ids: list[int] = field(default_factory=list)
    pending_text: list[str] = field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = field(default_factory=list)
    pending_ranks: list[int] = field(default_factory=list)
    prompt_logprobs: tuple[list[dict[int, float]], list[int]] | None = None  # not yet sent
    prompt_logprobs_seen: bool = False  # sent once (a recompute after preemption brings them again)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestText] = {}

    def add_request(self, req: Request) -> None:
        p = req.params
        detok = None if self.tokenizer is None else IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output, min_tokens=p.min_tokens,
        )
        self.states[req.request_id] = _RequestText(detok)

    def on_token(self, req: Request, tok: SampledToken) -> str | None:
        """Record one sampled token; return the stop string if it matched one."""
        st = self.states[req.request_id]
        st.cumulative_logprob += tok.logprob
        st.pending_ids.append(tok.token_id)
        if req.params.logprobs is not None:
            st.pending_logprobs.append(tok.top_logprobs or {})
            st.pending_ranks.append(tok.rank)
        if tok.prompt_logprobs is not None and not st.prompt_logprobs_seen:
            st.prompt_logprobs, st.prompt_logprobs_seen = (tok.prompt_logprobs, tok.prompt_ranks or []), True
        if st.detok is None or _is_hidden_stop_token(req, tok.token_id):
            return None
        delta, matched = st.detok.add_token(tok.token_id)
        st.pending_text.append(delta)
        return matched

    def delta(self, req: Request, finished: bool) -> RequestDelta:
        """The request's output since the last delta; drops its state when it finished."""
        st = self.states[req.request_id]
        if finished and st.detok is not None and not isinstance(req.stop_reason, str):
            st.pending_text.append(st.detok.flush())  # text held back as a possible stop-string start
            if st.detok.matched_stop is not None:  # the stop completed only inside the flushed bytes
                req.finish_reason, req.stop_reason = "stop", st.detok.matched_stop
        out = RequestDelta(
            request_id=req.request_id,
            new_token_ids=st.pending_ids,
            new_text="".join(st.pending_text),
            new_logprobs=st.pending_logprobs if req.params.logprobs is not None else None,
            new_logprob_ranks=st.pending_ranks if req.params.logprobs is not None else None,
            prompt_logprobs=st.prompt_logprobs[0] if st.prompt_logprobs else None,
            prompt_logprob_ranks=st.prompt_logprobs[1] if st.prompt_logprobs else None,
            cumulative_logprob=st.cumulative_logprob,
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
            num_cached_tokens=req.num_cached_tokens,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            last_token_time=req.last_token_time,
            first_scheduled_time=req.first_scheduled_time,
            preempted=req.is_preempted,
        )
        st.pending_ids, st.pending_text, st.pending_logprobs, st.pending_ranks = [], [], [], []
        st.prompt_logprobs = None
        if finished:
            del self.states[req.request_id]
        return out


def _is_hidden_stop_token(req: Request, token_id: int) -> bool:
    """A stop_token_ids or EOS token that ends the request: its text is left out unless include_stop_str_in_output
    (as vLLM; it shows only with skip_special_tokens=False); the id stays in token_ids."""
    p = req.params
    stops = token_id in p.stop_token_ids or (not p.ignore_eos and token_id in req.eos_token_ids)
    return (stops and not p.include_stop_str_in_output
            and len(req.output_token_ids) >= p.min_tokens and req.output_token_ids[-1] == token_id)

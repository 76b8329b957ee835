"""Structured outputs in the worker that samples: grammars compiled once per process, a matcher per request.

A `GrammarBook` belongs to one sampling worker (the decode executor, the prefill worker). For every row
of a step whose params carry `structured_outputs`, it holds an xgrammar matcher that has consumed the
request's output tokens so far: built by replaying `output_token_ids` when the book first sees the request
(or when the count no longer matches: preemption, a hand-off from another process), then advanced with
each sampled token. Its bitmask (xgrammar's packed int32 layout, [B, ceil(V / 32)]) is applied by the
batched sampler. Once the grammar is complete only the stop tokens (EOS) are allowed, so the request
ends with finish_reason 'stop' through the ordinary EOS rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

import torch

from rapid.params import StructuredOutputsParams
from rapid.protocol.worker import SeqWork

logger = logging.getLogger(__name__)


JSON_OBJECT_SCHEMA = '{"type": "object"}'


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check_structured_outputs(spec: StructuredOutputsParams) -> None:
    """Parse the spec without a tokenizer (cheap): ValueError naming the field when xgrammar refuses it."""
    import xgrammar as xgr

    try:
        if spec.json is not None:
            xgr.Grammar.from_json_schema(spec.json)
        elif spec.regex is not None:
            xgr.Grammar.from_regex(spec.regex)
        elif spec.grammar is not None:
            xgr.Grammar.from_ebnf(spec.grammar)
        elif spec.choice is not None:
            xgr.Grammar.from_ebnf(choice_ebnf(spec.choice))
    except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses
        field = next(n for n in ("json", "regex", "grammar", "choice") if getattr(spec, n) is not None)
        raise ValueError(f"structured_outputs.{field} is not accepted by xgrammar: {e}") from None


class _Matcher:
    def __init__(self, matcher, tokens: list[int]):
        self.matcher = matcher
        self.num_consumed = len(tokens)


class GrammarBook:
    """One process's compiled grammars (keyed by spec) and its matchers (keyed by request id)."""

    def __init__(self, tokenizer_path: str | None, stop_token_ids: Sequence[int]):
        self.tokenizer_path = tokenizer_path
        self.stop_token_ids = list(stop_token_ids)
        self.vocab_size = 0  # the logits' width, set by the first bitmask() call
        self._compiler = None  # built on the first structured request (loads the tokenizer)
        self._keep: torch.Tensor | None = None  # bitmask words without the special tokens (stop tokens kept)
        self._compiled: dict[StructuredOutputsParams, object] = {}
        self._matchers: dict[str, _Matcher] = {}

    # ------------------------------------------------------------------ compilation (once per spec)
    def _compile(self, spec: StructuredOutputsParams):
        compiled = self._compiled.get(spec)
        if compiled is not None:
            return compiled
        import xgrammar as xgr

        if self._compiler is None:
            if self.tokenizer_path is None:
                raise RuntimeError("structured outputs need a tokenizer (the engine was started without one)")
            from rapid.core.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_path)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids or None)
            self._keep = _without_special_tokens(tokenizer, self.vocab_size, self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        c = self._compiler
        if spec.json is not None:
            compiled = c.compile_json_schema(spec.json, any_whitespace=not spec.disable_any_whitespace)
        elif spec.regex is not None:
            compiled = c.compile_regex(spec.regex)
        elif spec.choice is not None:
            compiled = c.compile_grammar(choice_ebnf(spec.choice))
        elif spec.grammar is not None:
            compiled = c.compile_grammar(spec.grammar)
        else:  # json_object: any JSON object, as OpenAI's JSON mode promises (xgrammar's builtin JSON takes arrays too)
            compiled = c.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=not spec.disable_any_whitespace)
        self._compiled[spec] = compiled
        return compiled

    # ------------------------------------------------------------------ matchers (one per request)
    def _matcher(self, w: SeqWork) -> _Matcher:
        m = self._matchers.get(w.request_id)
        if m is not None and m.num_consumed == len(w.output_token_ids):
            return m
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self._compile(w.params.structured_outputs))
        for t in w.output_token_ids:  # replay: preemption, recompute, or a request first seen by this process
            if not matcher.accept_token(t):
                logger.warning("request %s: output token %d does not fit its grammar on replay", w.request_id, t)
                break
        m = self._matchers[w.request_id] = _Matcher(matcher, list(w.output_token_ids))
        return m

    def bitmask(self, rows: Sequence[SeqWork], vocab_size: int, device: torch.device) -> torch.Tensor | None:
        """[B, ceil(V / 32)] int32 allowed-token bits for the sampling rows (all ones for unconstrained
        rows); None when no row is constrained. `vocab_size`: V, the logits' width."""
        constrained = [i for i, w in enumerate(rows) if w.params.structured_outputs is not None]
        if not constrained:
            return None
        if self._compiler is None:
            self.vocab_size = vocab_size
            self.stop_token_ids = [t for t in self.stop_token_ids if 0 <= t < vocab_size]
        words = (self.vocab_size + 31) // 32
        mask = torch.full((len(rows), words), -1, dtype=torch.int32)
        for i in constrained:
            m = self._matcher(rows[i]).matcher
            if m.is_terminated():  # complete and its stop token already taken: only EOS again
                mask[i] = 0
                for t in self.stop_token_ids:
                    mask[i, t // 32] |= _bit(t % 32)
            else:
                m.fill_next_token_bitmask(mask, i)
                if self._keep is not None:
                    mask[i] &= self._keep
        return mask.to(device, non_blocking=True)

    def advance(self, rows: Sequence[SeqWork], token_ids: Sequence[int]) -> None:
        """Feed each constrained row's sampled token to its matcher."""
        for w, t in zip(rows, token_ids):
            if w.params.structured_outputs is None:
                continue
            m = self._matchers.get(w.request_id)
            if m is None:
                continue
            m.num_consumed += 1
            if not m.matcher.is_terminated() and not m.matcher.accept_token(t):
                logger.warning("request %s: sampled token %d does not fit its grammar", w.request_id, t)

    def retain(self, request_ids: Iterable[str]) -> None:
        """Forget the matchers of every request not in `request_ids` (finished, dropped, handed off)."""
        keep = set(request_ids)
        for rid in [r for r in self._matchers if r not in keep]:
            del self._matchers[rid]


def _without_special_tokens(tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> torch.Tensor | None:
    """Bitmask words allowing every token but the special ones (<s>, <|user|>, ...; not the stop tokens), or None.
    xgrammar matches a special token as its literal text ('<s>' inside a JSON string or a regex's '.'), but the
    detokenizer drops it (skip_special_tokens), so the output would not match the grammar."""
    special = {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    special |= set(getattr(tokenizer, "all_special_ids", ()))
    banned = sorted(t for t in special - set(stop_token_ids) if 0 <= t < vocab_size)
    if not banned:
        return None
    keep = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
    for t in banned:
        keep[t // 32] &= ~_bit(t % 32)
    return keep


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if i == 31 else 1 << i

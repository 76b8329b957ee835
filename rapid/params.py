"""SamplingParams: per-request sampling options with vLLM's names and defaults (plain Python, no torch).

A frozen `msgspec.Struct`, so it travels over ZeroMQ with `msgspec.msgpack.encode` / `decode(type=...)`
and is validated again on decoding.
"""

from __future__ import annotations

import copy
import json as _json
import math
from typing import Any

import msgspec

__all__ = ["MAX_LOGPROBS", "GuidedDecodingParams", "SamplingParams", "StructuredOutputsParams"]

MAX_LOGPROBS = 20


# ------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not -2**63 <= value < 2**63:  # what crosses a process boundary (msgpack) and what torch takes
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value!r}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


STRUCTURED_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")  # StructuredOutputsParams: one of these


class StructuredOutputsParams(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on the generated text (vLLM's StructuredOutputsParams): exactly one of
    `json` (a JSON schema, dict or str), `regex`, `choice` (the output is one of these strings),
    `grammar` (EBNF / GBNF text) or `json_object=True` (any JSON object).

    The grammar is compiled by xgrammar in the process that samples; the request ends ('stop') when
    the grammar is complete (only EOS is allowed then). `json` is normalised to a JSON string.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # json / json_object: no optional whitespace between tokens (compact JSON)

    def __post_init__(self) -> None:
        set_ = msgspec.structs.force_setattr
        given = [n for n in STRUCTURED_CONSTRAINTS if getattr(self, n) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")
        if isinstance(self.json, dict):
            set_(self, "json", _json.dumps(self.json))
        elif self.json is not None and not isinstance(self.json, str):
            raise TypeError(f"structured_outputs.json must be a dict or a str, got {type(self.json).__name__}")
        elif isinstance(self.json, str):
            try:
                _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty str, got {value!r}")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice:
                raise ValueError(f"structured_outputs.choice must be a non-empty list of str, got {choice!r}")
            if not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"structured_outputs.choice must contain non-empty strs, got {list(choice)!r}")
            set_(self, "choice", tuple(choice))
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise TypeError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling options (vLLM names and defaults).

    Validated on construction (and on msgspec decoding): `ValueError` naming the field, the allowed
    range and the bad value; `TypeError` for a value of the wrong type (bools are not ints here).
    Normalisation: float fields become floats, ``top_k=-1`` becomes 0 (both mean "off"),
    ``stop`` becomes a tuple of strings (``()`` for None), ``stop_token_ids`` a tuple of ints.

    Serialise with ``msgspec.msgpack.encode(params)`` / ``msgspec.msgpack.decode(b, type=SamplingParams)``
    or with `to_dict` / `from_dict`.
    """

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None  # -1 means None (unseeded), as vLLM
    max_tokens: int | None = 16  # None: up to max_model_len - prompt length
    min_tokens: int = 0
    stop: tuple[str, ...] | None = None  # str or list[str] accepted; normalised to a tuple
    stop_token_ids: tuple[int, ...] | None = None  # normalised to a tuple
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N logprobs per generated token (sampled token always included)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (the prompt token always included)
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (clamped to [-100, 100])
    allowed_token_ids: tuple[int, ...] | None = None  # only these tokens may be sampled
    bad_words: tuple[str, ...] | None = None  # words (token sequences) that must not be generated
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name: moved to structured_outputs
    # Filled at the edge (LLM) from bad_words with the tokenizer, as vLLM does: banned token sequences.
    bad_words_token_ids: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        set_ = msgspec.structs.force_setattr

        n = _check_int("n", self.n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")

        temperature = _check_float("temperature", self.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        set_(self, "temperature", temperature)

        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_(self, "top_p", top_p)

        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or a positive int, got {top_k!r}")
        set_(self, "top_k", max(top_k, 0))

        min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        set_(self, "min_p", min_p)

        if self.seed is not None:
            if _check_int("seed", self.seed) == -1:  # vLLM's (and OpenAI clients') "no seed"
                set_(self, "seed", None)

        max_tokens = None if self.max_tokens is None else _check_int("max_tokens", self.max_tokens)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens!r}")
        min_tokens = _check_int("min_tokens", self.min_tokens)
        if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens!r}"
            )

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
            set_(self, name, value)

        rep = _check_float("repetition_penalty", self.repetition_penalty)
        if not (math.isfinite(rep) and rep > 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        set_(self, "repetition_penalty", rep)

        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs!r}")

        self._check_extensions()
        set_(self, "stop", _normalise_stop(self.stop))
        set_(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_extensions(self) -> None:
        """prompt_logprobs, logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens, structured outputs."""
        set_ = msgspec.structs.force_setattr
        if self.prompt_logprobs is not None:
            n = _check_int("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= n <= MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {n!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tok = int(k) if isinstance(k, str) else _check_int("logit_bias key", k)
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if tok < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {tok!r}")
                value = _check_float(f"logit_bias[{tok}]", v)
                if not math.isfinite(value):
                    raise ValueError(f"logit_bias[{tok}] must be finite, got {v!r}")
                bias[tok] = min(max(value, -100.0), 100.0)
            set_(self, "logit_bias", bias)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {ids!r}")
            for i in ids:
                if not _is_int(i) or i < 0:
                    raise ValueError(f"allowed_token_ids must contain token ids >= 0, got {i!r}")
            set_(self, "allowed_token_ids", tuple(ids))
        if self.bad_words is not None:
            words = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"bad_words must be a list of non-empty str, got {self.bad_words!r}")
            set_(self, "bad_words", tuple(words))
        if self.bad_words_token_ids is not None:
            set_(self, "bad_words_token_ids", tuple(tuple(_check_int("bad_words_token_ids", t) for t in seq)
                                                    for seq in self.bad_words_token_ids))
        if self.truncate_prompt_tokens is not None:
            k = _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if k < 1:
                raise ValueError(f"truncate_prompt_tokens must be >= 1, got {k!r}")
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), not both")
            set_(self, "structured_outputs", self.guided_decoding)
            set_(self, "guided_decoding", None)
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            if isinstance(so, dict):
                set_(self, "structured_outputs", StructuredOutputsParams(**so))
            else:
                raise TypeError(f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}")

    @property
    def greedy(self) -> bool:
        """True when the row takes the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's name). SamplingParams is frozen: for changed fields use
        `msgspec.structs.replace(params, max_tokens=...)`."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (tuples stay tuples)."""
        return msgspec.structs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        """Inverse of `to_dict`; unknown keys raise TypeError, bad values ValueError/TypeError."""
        return cls(**d)


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__} {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop must contain only str, got {type(s).__name__} {s!r}")
        if not s:
            raise ValueError(f"stop strings must be non-empty, got {s!r} in {list(stop)!r}")
    return tuple(stop)


def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"stop_token_ids must be a list of int, got {type(ids).__name__} {ids!r}")
    for i in ids:
        if _check_int("stop_token_ids entry", i) < 0:
            raise ValueError(f"stop_token_ids must be >= 0, got {i!r}")
    return tuple(ids)

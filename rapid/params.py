"""SamplingParams: per-request sampling options with vLLM's names and defaults (plain Python, no torch).

A frozen `msgspec.Struct`, so it travels over ZeroMQ with `msgspec.msgpack.encode` / `decode(type=...)`
and is validated again on decoding.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

__all__ = ["MAX_LOGPROBS", "SamplingParams"]

MAX_LOGPROBS = 20


# ------------------------------------------------------------------------------------------------
# SamplingParams
# ------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


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
    seed: int | None = None
    max_tokens: int = 16
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
            _check_int("seed", self.seed)

        max_tokens = _check_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
        min_tokens = _check_int("min_tokens", self.min_tokens)
        if not 0 <= min_tokens <= max_tokens:
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

        set_(self, "stop", _normalise_stop(self.stop))
        set_(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """True when the row takes the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

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
        if not _is_int(i):
            raise TypeError(f"stop_token_ids must contain only int, got {type(i).__name__} {i!r}")
        if i < 0:
            raise ValueError(f"stop_token_ids must be >= 0, got {i!r}")
    return tuple(ids)

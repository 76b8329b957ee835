"""Request generators for the serving benchmark, in the manner of ``vllm bench serve``.

Three sources, all reproducible from a seed (``numpy.random.Generator``):

* :func:`random_requests` -- vllm's ``random`` dataset: uniform lengths around a target,
  random token ids.
* :func:`sharegpt_requests` -- a local ShareGPT-format JSON file (e.g.
  ``ShareGPT_V3_unfiltered_cleaned_split.json``), tokenised with a caller-supplied tokenizer.
* :func:`sharegpt_like_requests` -- a built-in lognormal approximation of ShareGPT's length
  distribution with random tokens, for when the file is not on disk (nothing is downloaded).

``seed`` may be an ``int`` or an existing ``numpy.random.Generator`` (passed through
``numpy.random.default_rng``); the same int always yields the same requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "SampleRequest",
    "TokenizerLike",
    "random_requests",
    "sharegpt_requests",
    "sharegpt_like_requests",
    "total_tokens",
    "SHAREGPT_MIN_LEN",
    "SHAREGPT_LIKE_MEAN_INPUT_LEN",
    "SHAREGPT_LIKE_MEAN_OUTPUT_LEN",
    "SHAREGPT_LIKE_SIGMA_INPUT",
    "SHAREGPT_LIKE_SIGMA_OUTPUT",
]

#: vllm's ShareGPT filter drops prompts or completions shorter than this many tokens.
SHAREGPT_MIN_LEN = 4

#: Mean prompt length (tokens) of the ShareGPT-like generator; see :func:`sharegpt_like_requests`.
SHAREGPT_LIKE_MEAN_INPUT_LEN = 161.0
#: Mean output length (tokens) of the ShareGPT-like generator.
SHAREGPT_LIKE_MEAN_OUTPUT_LEN = 338.0
#: Lognormal shape (std of log length) of the prompt lengths. Our choice, not a published fit.
SHAREGPT_LIKE_SIGMA_INPUT = 1.0
#: Lognormal shape (std of log length) of the output lengths. Our choice, not a published fit.
SHAREGPT_LIKE_SIGMA_OUTPUT = 0.9

# Float noise guard for the length bounds: 100 * (1 + 0.1) == 110.00000000000001 in binary
# floating point, whose ceil would be 111.
_BOUND_EPS = 1e-9


class TokenizerLike(Protocol):
    """Anything with ``encode(text) -> list[int]``.

    ``transformers`` tokenizers qualify; so does a ``tokenizers.Tokenizer``, whose ``encode``
    returns an ``Encoding`` (its ``.ids`` are used).
    """

    def encode(self, text: str) -> Any: ...


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request, before it is sent.

    Attributes:
        prompt_token_ids: The prompt as token ids, or ``None`` when only text is known.
        prompt: The prompt as text, or ``None`` for synthetic token-id prompts.
        prompt_len: Prompt length in tokens.
        output_len: Number of tokens to generate (``max_tokens``; the driver should ignore
            EOS so that the request really produces this many).
    """

    prompt_token_ids: list[int] | None
    prompt: str | None
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.prompt_token_ids is None and self.prompt is None:
            raise ValueError("SampleRequest needs prompt_token_ids or prompt (or both)")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(
                f"prompt_len and output_len must be >= 1, got {self.prompt_len}, {self.output_len}"
            )
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(
                f"prompt_len={self.prompt_len} but prompt_token_ids has "
                f"{len(self.prompt_token_ids)} ids"
            )


# --------------------------------------------------------------------------------------------
# helpers


def _check_count(num: int) -> None:
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")


def _allowed_token_ids(vocab_size: int, avoid_ids: Iterable[int] | None) -> np.ndarray:
    """Token ids in ``[0, vocab_size)`` minus ``avoid_ids`` (e.g. BOS/EOS/pad)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    allowed = np.arange(vocab_size, dtype=np.int64)
    if avoid_ids:
        allowed = np.setdiff1d(allowed, np.fromiter(avoid_ids, dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("avoid_ids leaves no token id in [0, vocab_size) to sample from")
    return allowed


def _random_tokens(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    return allowed[rng.integers(0, allowed.size, size=n)].tolist()


def _random_token_requests(rng: np.random.Generator, allowed: np.ndarray, input_lens, output_lens) -> list[SampleRequest]:
    """One request of random prompt tokens per (input length, output length) pair."""
    return [
        SampleRequest(
            prompt_token_ids=_random_tokens(rng, allowed, int(n_in)),
            prompt=None,
            prompt_len=int(n_in),
            output_len=int(n_out),
        )
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def _length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """vllm's random-dataset interval ``[floor(L(1-r)), ceil(L(1+r))]``, lower bound >= 1."""
    low = math.floor(length * (1.0 - range_ratio) + _BOUND_EPS)
    high = math.ceil(length * (1.0 + range_ratio) - _BOUND_EPS)
    return max(low, 1), max(high, 1)


# --------------------------------------------------------------------------------------------
# random


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int | np.random.Generator = 0,
    *,
    avoid_ids: Iterable[int] | None = None,
) -> list[SampleRequest]:
    """vllm's ``random`` dataset: uniform lengths around a target, random token ids.

    Prompt lengths are drawn uniformly from the integers in
    ``[floor(input_len * (1 - range_ratio)), ceil(input_len * (1 + range_ratio))]`` and output
    lengths likewise around ``output_len`` (both lower bounds raised to 1), as vllm's
    ``RandomDataset`` does; ``range_ratio`` must lie in ``[0, 1)``. Unlike vllm, no special
    tokens are subtracted from ``input_len`` (there is no tokenizer here: the ids are sent as
    they are), and float noise in the bounds is rounded away (vllm's ``ceil(100 * 1.1)`` is 111).

    Token ids are i.i.d. uniform over ``[0, vocab_size)`` minus ``avoid_ids`` (pass the
    tokenizer's special ids so that no prompt contains an EOS or BOS in the middle).

    Returns:
        ``num`` requests with ``prompt_token_ids`` set and ``prompt=None``.
    """
    _check_count(num)
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len}, {output_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    allowed = _allowed_token_ids(vocab_size, avoid_ids)
    rng = np.random.default_rng(seed)

    in_low, in_high = _length_bounds(input_len, range_ratio)
    out_low, out_high = _length_bounds(output_len, range_ratio)
    input_lens = rng.integers(in_low, in_high + 1, size=num)
    output_lens = rng.integers(out_low, out_high + 1, size=num)
    return _random_token_requests(rng, allowed, input_lens, output_lens)


# --------------------------------------------------------------------------------------------
# ShareGPT file


def _encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    encoded = tokenizer.encode(text)
    ids = getattr(encoded, "ids", encoded)  # tokenizers.Encoding -> .ids
    return list(ids)


def _first_turns(entry: Any, index: int) -> tuple[str, str] | None:
    """(first human turn, first gpt turn after it) of one ShareGPT entry, or None if absent.

    Raises ValueError when the entry does not have the ShareGPT shape at all.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise ValueError(
            f"ShareGPT entry {index} is not an object with a 'conversations' list: "
            f"{str(entry)[:120]!r}"
        )
    prompt: str | None = None
    for turn in entry["conversations"]:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise ValueError(
                f"ShareGPT entry {index} has a turn without string 'from' and 'value': "
                f"{str(turn)[:120]!r}"
            )
        if prompt is None:
            if turn["from"] == "human":
                prompt = turn["value"]
        elif turn["from"] == "gpt":
            return prompt, turn["value"]
    return None


def sharegpt_requests(
    path: str | Path,
    num: int,
    tokenizer: TokenizerLike,
    seed: int | np.random.Generator = 0,
    max_len: int = 2048,
    *,
    fixed_output_len: int | None = None,
) -> list[SampleRequest]:
    """Sample ``num`` requests from a local ShareGPT-format JSON file.

    The file is a JSON list of ``{"conversations": [{"from": "human" | "gpt", "value": str},
    ...]}`` (the format of ``ShareGPT_V3_unfiltered_cleaned_split.json``). For each entry the
    first ``human`` turn is the prompt and the first ``gpt`` turn after it the completion; the
    prompt length is the number of tokens of the prompt and the output length the number of
    tokens of the completion (or ``fixed_output_len``), both by ``tokenizer.encode`` (a
    ``transformers`` tokenizer's ``encode`` adds BOS, as vllm's ``tokenizer(prompt)`` does).

    Entries are visited in a seeded random order and kept, as vllm's ShareGPT sampler does,
    only if ``prompt_len >= 4``, ``output_len >= 4`` (not checked when ``fixed_output_len`` is
    given) and ``prompt_len + output_len <= max_len``; entries without a human turn followed
    by a gpt turn are skipped. Sampling stops after ``num`` kept entries, so only those visited
    are tokenised.

    Returns:
        ``num`` requests with both ``prompt`` and ``prompt_token_ids`` set.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not JSON, not a list of ShareGPT entries, or has fewer than
            ``num`` usable entries.
    """
    _check_count(num)
    if fixed_output_len is not None and fixed_output_len < 1:
        raise ValueError(f"fixed_output_len must be >= 1, got {fixed_output_len}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ShareGPT file not found: {path} (expected a local JSON file such as "
            "ShareGPT_V3_unfiltered_cleaned_split.json; nothing is downloaded)"
        )
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"ShareGPT file {path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"ShareGPT file {path} is not UTF-8 text: {err}") from err
    if not isinstance(data, list):
        raise ValueError(
            f"ShareGPT file {path} must hold a JSON list of conversations, "
            f"got {type(data).__name__}"
        )

    rng = np.random.default_rng(seed)
    out: list[SampleRequest] = []
    if num == 0:
        return out
    for index in rng.permutation(len(data)).tolist():
        turns = _first_turns(data[index], index)
        if turns is None:
            continue
        prompt, completion = turns
        prompt_ids = _encode(tokenizer, prompt)
        prompt_len = len(prompt_ids)
        if fixed_output_len is None:
            output_len = len(_encode(tokenizer, completion))
            if output_len < SHAREGPT_MIN_LEN:
                continue
        else:
            output_len = fixed_output_len
        if prompt_len < SHAREGPT_MIN_LEN or prompt_len + output_len > max_len:
            continue
        out.append(SampleRequest(prompt_ids, prompt, prompt_len, output_len))
        if len(out) == num:
            return out
    raise ValueError(
        f"ShareGPT file {path} has only {len(out)} usable conversations "
        f"(prompt and output >= {SHAREGPT_MIN_LEN} tokens, total <= {max_len}); {num} requested"
    )


# --------------------------------------------------------------------------------------------
# ShareGPT-like synthetic lengths


def _lognormal_lengths(
    rng: np.random.Generator, mean: float, sigma: float, size: int
) -> np.ndarray:
    """Lognormal samples with the given (unclipped) mean: mu = ln(mean) - sigma^2 / 2."""
    mu = math.log(mean) - sigma * sigma / 2.0
    return np.rint(rng.lognormal(mean=mu, sigma=sigma, size=size)).astype(np.int64)


def sharegpt_like_requests(
    num: int,
    vocab_size: int,
    seed: int | np.random.Generator = 0,
    max_len: int = 2048,
    *,
    avoid_ids: Iterable[int] | None = None,
    mean_input_len: float = SHAREGPT_LIKE_MEAN_INPUT_LEN,
    mean_output_len: float = SHAREGPT_LIKE_MEAN_OUTPUT_LEN,
    sigma_input: float = SHAREGPT_LIKE_SIGMA_INPUT,
    sigma_output: float = SHAREGPT_LIKE_SIGMA_OUTPUT,
) -> list[SampleRequest]:
    """Synthetic requests whose lengths roughly follow ShareGPT's; nothing is downloaded.

    Prompt and output lengths are independent lognormals, parameterised by their mean and the
    standard deviation ``sigma`` of the log length (``mu = ln(mean) - sigma**2 / 2``), rounded
    to integers and clipped: the prompt to ``[4, max_len - 4]``, then the output to
    ``[4, max_len - prompt_len]``, so every request passes the same filter as
    :func:`sharegpt_requests` (both >= 4 tokens, total <= ``max_len``).

    Where the defaults come from (approximations, not a fit to the data):

    * Means: 161 prompt tokens and 338 output tokens, the averages the vLLM paper (Kwon et al.,
      "Efficient Memory Management for Large Language Model Serving with PagedAttention",
      SOSP 2023, Fig. 11a) gives for ShareGPT (161.31 and 337.99 tokens as we recall them;
      not re-checked against the paper here). Other setups (another tokenizer, vllm's
      first-turn sampling and length filter, the DistServe chatbot workload) report other
      means, with prompt means quoted from about 161 up to about 300 tokens; pass
      ``mean_input_len`` / ``mean_output_len`` to match a particular measurement.
    * Shapes: ``sigma_input = 1.0`` and ``sigma_output = 0.9`` are our choice, picked to give
      a heavy right tail like the paper's histograms (median = mean * exp(-sigma**2 / 2), about
      0.61x the mean for prompts and 0.67x for outputs; p99 = median * exp(2.326 * sigma),
      about 10x and 8x the median). They are not a published fit.

    Clipping pulls the realised means below the nominal ones: at ``max_len=2048`` to about
    160 prompt and 330 output tokens (measured over 200k samples, seed 0).

    Returns:
        ``num`` requests with random ``prompt_token_ids`` (ids in ``[0, vocab_size)`` minus
        ``avoid_ids``) and ``prompt=None``.
    """
    _check_count(num)
    if max_len < 2 * SHAREGPT_MIN_LEN:
        raise ValueError(f"max_len must be >= {2 * SHAREGPT_MIN_LEN}, got {max_len}")
    for name, value in (
        ("mean_input_len", mean_input_len),
        ("mean_output_len", mean_output_len),
        ("sigma_input", sigma_input),
        ("sigma_output", sigma_output),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive and finite, got {value}")
    allowed = _allowed_token_ids(vocab_size, avoid_ids)
    rng = np.random.default_rng(seed)

    input_lens = np.clip(
        _lognormal_lengths(rng, mean_input_len, sigma_input, num),
        SHAREGPT_MIN_LEN,
        max_len - SHAREGPT_MIN_LEN,
    )
    output_lens = np.clip(
        _lognormal_lengths(rng, mean_output_len, sigma_output, num),
        SHAREGPT_MIN_LEN,
        max_len - input_lens,
    )
    return _random_token_requests(rng, allowed, input_lens, output_lens)


def total_tokens(requests: Sequence[SampleRequest]) -> tuple[int, int]:
    """(sum of prompt lengths, sum of output lengths) of a request list."""
    return sum(r.prompt_len for r in requests), sum(r.output_len for r in requests)

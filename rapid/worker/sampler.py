"""The batched sampler (SamplingParams itself lives in rapid.params).

The sampler works on one engine step: `SamplingBatch.build(...)` turns the B rows' parameters into
tensors once, and `sample(logits, batch, generator)` picks one token per row.  Processing order
(vLLM v1's order):

    raw logits ──> logprobs (log_softmax of the raw logits, if asked for)
        │
        ├─ allowed tokens: structured-output grammar bitmask and allowed_token_ids (others -> -inf)
        ├─ logit_bias added
        ├─ bans: EOS / stop_token_ids while a row is short of min_tokens, bad_words' next tokens
        ├─ penalties: repetition (prompt + output tokens), frequency and presence (output tokens)
        ├─ greedy rows: argmax
        └─ random rows: / temperature -> min_p -> top_k -> top_p -> exponential race (rapid.worker.exponential_race)

Expensive work (penalty bincounts, the top-k / top-p sort, logprobs) only runs when some row in
the batch needs it.  The penalty and top-k / top-p filters themselves are in
rapid.worker.sampler_ops.

Seeded rows are reproducible independently of the batch they are in and of the process that samples
them: the noise for a row with seed ``s`` at step ``t`` (tokens the request has generated so far) is
a hash of the key ``mix_seed(s, t)`` and the token id (the same noise on the CPU and on CUDA, up to the
rounding of log); other rows draw from the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from rapid.params import SamplingParams, _is_int
from rapid.worker.sample_result import PendingSample, SamplerOutput
from rapid.worker.exponential_race import sample_race
from rapid.worker.transfer import to_device
from rapid.worker.sampler_ops import (
    apply_penalties, apply_top_k_top_p, bad_word_bans, logprob_entries, mix_seed, token_logprob, unpack_bitmask,
)

__all__ = ["SamplingBatch", "SamplerOutput", "PendingSample", "sample", "sample_async", "process_logits", "mix_seed"]

# ------------------------------------------------------------------------------------------------
# Batched sampler
# ------------------------------------------------------------------------------------------------


@dataclass
class SamplingBatch:
    """Per-step sampling state for B rows, as tensors on the logits' device.

    Optional tensors are None when no row of the batch needs them, which is what lets `sample`
    skip the corresponding work.
    """

    batch_size: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    any_greedy: bool
    greedy: Tensor  # [B] bool
    temperature: Tensor | None  # [B] float32, 1.0 on greedy rows; None when all rows are greedy
    min_p: Tensor | None  # [B] float32
    top_k: Tensor | None  # [B] int64 in [1, V] (V = off)
    top_k_max: int  # largest top_k below V in the batch (0 when top_k is None)
    top_p: Tensor | None  # [B] float32 (1.0 = off)
    # penalties
    repetition_penalty: Tensor | None  # [B] float32
    frequency_penalty: Tensor | None  # [B] float32
    presence_penalty: Tensor | None  # [B] float32
    output_counts: Tensor | None  # [B, V] float32: occurrences of each token in the row's output
    prompt_mask: Tensor | None  # [B, V] bool: token occurs in the row's prompt
    # allowed tokens (grammar bitmask and allowed_token_ids): [B, V] bool, None when no row is constrained
    allowed: Tensor | None
    # logit_bias: logits[rows, ids] += values
    bias_rows: Tensor | None  # [K] int64
    bias_ids: Tensor | None  # [K] int64
    bias_values: Tensor | None  # [K] float32
    # bans (min_tokens' stop tokens, bad_words): (rows, token ids) set to -inf
    banned_rows: Tensor | None  # [M] int64
    banned_ids: Tensor | None  # [M] int64
    # seeded random rows
    seeded_rows: list[int]
    seeded_keys: list[int]  # mix_seed(seed, step), one per seeded row
    # logprobs
    max_num_logprobs: int  # -1 when no row asks for logprobs
    num_logprobs: list[int | None]

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]] | None,
        prompt_token_ids: Sequence[Sequence[int]] | None,
        step_indices: Sequence[int] | None,
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        grammar_bitmask: Tensor | None = None,
    ) -> "SamplingBatch":
        """Build the step's batch.

        params:           one SamplingParams per row (B rows).
        output_token_ids: tokens each row has generated so far (used only by the penalties; may be
                          None when no row has a penalty and step_indices is given).
        prompt_token_ids: each row's prompt (used only by the repetition penalty; may be None
                          when no row has repetition_penalty != 1).
        step_indices:     per row, how many tokens the request has already generated (drives the
                          seeded noise and min_tokens); None means len(output_token_ids[i]).
        vocab_size:       V, the logits' last dimension.
        eos_token_ids:    EOS ids masked while a row is below min_tokens (unless ignore_eos):
                          either one flat collection shared by all rows, or one per row.
        grammar_bitmask:  [B, ceil(V / 32)] int32 allowed tokens of structured-output rows (all ones for
                          the others; rapid.worker.grammar), or None.
        """
        device = torch.device(device)
        B, V = len(params), vocab_size
        if output_token_ids is not None and len(output_token_ids) != B:
            raise ValueError(f"output_token_ids has {len(output_token_ids)} rows, expected {B}")
        if prompt_token_ids is not None and len(prompt_token_ids) != B:
            raise ValueError(f"prompt_token_ids has {len(prompt_token_ids)} rows, expected {B}")
        if step_indices is None:
            if output_token_ids is None:
                raise ValueError("step_indices or output_token_ids is required")
            step_indices = [len(o) for o in output_token_ids]
        elif len(step_indices) != B:
            raise ValueError(f"step_indices has {len(step_indices)} rows, expected {B}")
        eos_per_row = _eos_per_row(eos_token_ids, B)

        greedy_list = [p.greedy for p in params]
        num_logprobs = [p.logprobs for p in params]
        return cls(
            batch_size=B,
            vocab_size=V,
            device=device,
            all_greedy=all(greedy_list),
            any_greedy=any(greedy_list),
            greedy=to_device(greedy_list, torch.bool, device),
            **_filter_fields(params, greedy_list, step_indices, V, device),
            **_penalty_fields(params, output_token_ids, prompt_token_ids, V, device),
            allowed=_allowed_mask(params, grammar_bitmask, V, device),
            **_bias_fields(params, V, device),
            **_ban_fields(params, step_indices, eos_per_row, output_token_ids, V, device),
            max_num_logprobs=min(max((n for n in num_logprobs if n is not None), default=-1), V),
            num_logprobs=num_logprobs,
        )


def _f32(values: list[float], device: torch.device) -> Tensor:
    return to_device(values, torch.float32, device)


def _filter_fields(params: Sequence[SamplingParams], greedy: list[bool], step_indices: Sequence[int],
                   V: int, device: torch.device) -> dict:
    """Temperature, min_p, top_k, top_p (None where no random row uses one) and the seeded rows' keys."""
    out: dict = dict(temperature=None, min_p=None, top_k=None, top_k_max=0, top_p=None, seeded_rows=[],
                     seeded_keys=[])
    if all(greedy):
        return out
    random_params = [p for p, g in zip(params, greedy) if not g]
    out["temperature"] = _f32([1.0 if g else p.temperature for p, g in zip(params, greedy)], device)
    if any(p.min_p > 0 for p in random_params):
        out["min_p"] = _f32([0.0 if g else p.min_p for p, g in zip(params, greedy)], device)
    if any(0 < p.top_k < V for p in random_params):
        ks = [V if (g or p.top_k == 0) else min(p.top_k, V) for p, g in zip(params, greedy)]
        out["top_k"] = to_device(ks, torch.int64, device)
        out["top_k_max"] = max(k for k in ks if k < V)
    if any(p.top_p < 1.0 for p in random_params):
        out["top_p"] = _f32([1.0 if g else p.top_p for p, g in zip(params, greedy)], device)
    for i, (p, g) in enumerate(zip(params, greedy)):
        if not g and p.seed is not None:
            out["seeded_rows"].append(i)
            out["seeded_keys"].append(mix_seed(p.seed, step_indices[i]))
    return out


def _penalty_fields(params: Sequence[SamplingParams], output_token_ids, prompt_token_ids, V: int,
                    device: torch.device) -> dict:
    """The three penalties (None where no row has one), each row's output token counts [B, V] and prompt mask
    [B, V] (only when a penalty needs them)."""
    B = len(params)
    out: dict = dict(repetition_penalty=None, frequency_penalty=None, presence_penalty=None, output_counts=None,
                     prompt_mask=None)
    need_rep = any(p.repetition_penalty != 1.0 for p in params)
    need_freq = any(p.frequency_penalty != 0.0 for p in params)
    need_pres = any(p.presence_penalty != 0.0 for p in params)
    if need_rep:
        out["repetition_penalty"] = _f32([p.repetition_penalty for p in params], device)
        if prompt_token_ids is None:
            raise ValueError("prompt_token_ids is required when a row has repetition_penalty")
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        out["prompt_mask"] = torch.zeros(B, V, dtype=torch.bool, device=device)  # [B, V]
        idx = _flat_token_index([prompt_token_ids[i] for i in rows], rows, V, device)
        out["prompt_mask"].view(-1)[idx] = True
    if need_freq:
        out["frequency_penalty"] = _f32([p.frequency_penalty for p in params], device)
    if need_pres:
        out["presence_penalty"] = _f32([p.presence_penalty for p in params], device)
    if need_rep or need_freq or need_pres:
        if output_token_ids is None:
            raise ValueError("output_token_ids is required when a row has a penalty")
        rows = [
            i for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        ]
        counts = torch.zeros(B, V, dtype=torch.float32, device=device)  # [B, V]
        idx = _flat_token_index([output_token_ids[i] for i in rows], rows, V, device)
        # float sums of 1.0 are exact (< 2**24), so the atomic order on GPUs does not matter
        counts.view(-1).index_add_(0, idx, torch.ones(idx.shape, device=device))
        out["output_counts"] = counts
    return out


def _ban_fields(params: Sequence[SamplingParams], step_indices: Sequence[int], eos_per_row, output_token_ids,
                V: int, device: torch.device) -> dict:
    """(row, token) pairs no row may emit now: stop tokens while short of min_tokens, bad_words' next tokens."""
    rows: list[int] = []
    ids: list[int] = []
    for i, p in enumerate(params):
        banned = set()
        if step_indices[i] < p.min_tokens:
            banned.update(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(eos_per_row[i])
        if p.bad_words_token_ids:
            if output_token_ids is None:
                raise ValueError("output_token_ids is required when a row has bad_words")
            banned.update(bad_word_bans(p.bad_words_token_ids, output_token_ids[i]))
        banned = sorted(t for t in banned if 0 <= t < V)
        rows.extend([i] * len(banned))
        ids.extend(banned)
    if not rows:
        return dict(banned_rows=None, banned_ids=None)
    return dict(banned_rows=to_device(rows, torch.int64, device), banned_ids=to_device(ids, torch.int64, device))


def _bias_fields(params: Sequence[SamplingParams], V: int, device: torch.device) -> dict:
    """logit_bias as (row, token, value) triples, or None."""
    if not any(p.logit_bias for p in params):
        return dict(bias_rows=None, bias_ids=None, bias_values=None)
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < V]
    return dict(bias_rows=to_device([e[0] for e in entries], torch.int64, device),
                bias_ids=to_device([e[1] for e in entries], torch.int64, device),
                bias_values=_f32([e[2] for e in entries], device))


def _allowed_mask(params: Sequence[SamplingParams], grammar_bitmask: Tensor | None, vocab_size: int,
                  device: torch.device) -> Tensor | None:
    """[B, V] bool: the grammar's allowed tokens and allowed_token_ids; None when no row is constrained."""
    allowed = None if grammar_bitmask is None else unpack_bitmask(grammar_bitmask.to(device), vocab_size)
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if rows:
        ids = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
        ids[[i for i in range(len(params)) if i not in rows]] = True
        idx = _flat_token_index([params[i].allowed_token_ids for i in rows], rows, vocab_size, device)
        ids.view(-1)[idx] = True
        allowed = ids if allowed is None else allowed & ids
    return allowed


def _eos_per_row(
    eos_token_ids: Sequence[int] | Sequence[Sequence[int]] | None, batch_size: int
) -> list[Sequence[int]]:
    if eos_token_ids is None:
        return [()] * batch_size
    items = list(eos_token_ids)
    if all(_is_int(t) for t in items):  # one shared collection (also covers an empty one)
        return [items] * batch_size
    if len(items) != batch_size:
        raise ValueError(f"eos_token_ids has {len(items)} rows, expected {batch_size}")
    return [list(row) if row is not None else [] for row in items]


def _flat_token_index(
    token_lists: Sequence[Sequence[int]], rows: Sequence[int], vocab_size: int, device: torch.device
) -> Tensor:
    """[N] int64 indices row * V + token into a flattened [B, V] tensor; out-of-range ids dropped."""
    flat: list[int] = []
    for row, tokens in zip(rows, token_lists):
        base = row * vocab_size
        flat.extend(base + t for t in tokens if 0 <= t < vocab_size)
    return to_device(flat, torch.int64, device)


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Allowed-token masks, logit_bias, bans and penalties on logits [B, V]; returns a new tensor when
    anything applies (the input itself, unmodified, otherwise). Temperature and filtering are not applied here."""
    x = logits
    if batch.allowed is not None:
        x = x.masked_fill(~batch.allowed, float("-inf"))
    if batch.bias_rows is not None:
        x = x.clone() if x is logits else x
        x.index_put_((batch.bias_rows, batch.bias_ids), batch.bias_values, accumulate=True)
    if batch.banned_rows is not None:
        x = x.clone() if x is logits else x
        x[batch.banned_rows, batch.banned_ids] = float("-inf")
    if batch.output_counts is not None:
        x = apply_penalties(
            x.clone() if x is logits else x,
            batch.output_counts,
            batch.prompt_mask,
            batch.repetition_penalty,
            batch.frequency_penalty,
            batch.presence_penalty,
        )
    return x


def sample_async(
    logits: Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> PendingSample:
    """Sample one token per row from logits [B, V] (float32, not modified) without waiting for the device
    (rows that ask for logprobs are the exception: their entries are read back at once).

    `generator` drives unseeded random rows (one engine-wide generator); None uses torch's default.
    """
    B, V = logits.shape
    if B != batch.batch_size or V != batch.vocab_size:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match batch ({batch.batch_size}, {batch.vocab_size})"
        )
    raw = logits.float()  # [B, V]
    x = process_logits(raw, batch)  # [B, V]

    if batch.all_greedy:
        tokens = x.argmax(dim=-1)  # [B]
    else:
        greedy_tokens = x.argmax(dim=-1) if batch.any_greedy else None  # [B]
        assert batch.temperature is not None
        scale = 1.0 / batch.temperature  # [B]
        if batch.min_p is not None or batch.top_k is not None or batch.top_p is not None:
            x = x * scale[:, None]  # [B, V]: the filters work on tempered logits
            scale = torch.ones_like(scale)
            if batch.min_p is not None:
                # keep p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
                threshold = x.amax(dim=-1, keepdim=True) + torch.log(batch.min_p)[:, None]  # [B, 1]
                x = x.masked_fill(x < threshold, float("-inf"))
            if batch.top_k is not None or batch.top_p is not None:
                x = apply_top_k_top_p(x, batch.top_k, batch.top_k_max, batch.top_p)
        # [B]: a draw from softmax(x * scale) per row (rapid.worker.exponential_race)
        random_tokens = sample_race(x, scale, generator, batch.seeded_rows, batch.seeded_keys)
        tokens = (
            torch.where(batch.greedy, greedy_tokens, random_tokens)
            if greedy_tokens is not None
            else random_tokens
        )

    # Logprobs of the raw logits: the sampled token's for every row (cumulative_logprob); the top-N where asked.
    logprobs: list[dict[int, float] | None] = [None] * B
    ranks = [0] * B
    if batch.max_num_logprobs >= 0:
        all_lp = torch.log_softmax(raw, dim=-1)  # [B, V]
        sampled_lp = all_lp.gather(1, tokens[:, None])[:, 0]  # [B]
        logprobs, ranks = logprob_entries(all_lp, tokens, batch.num_logprobs)
    else:
        sampled_lp = token_logprob(raw, tokens)  # [B], one pass on CUDA
    return PendingSample(tokens, sampled_lp, logprobs, ranks)


def sample(
    logits: Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> SamplerOutput:
    """`sample_async`, waited for."""
    return sample_async(logits, batch, generator).result()

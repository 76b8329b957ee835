"""Logit filters of the batched sampler (rapid.worker.sampler), on plain [B, V] tensors.

apply_penalties: repetition, frequency and presence penalties;
apply_top_k_top_p: the top-k / top-p masks (the only sort in the sampler);
mix_seed: the generator seed of a seeded row at one step;
unpack_bitmask: a packed allowed-token bitmask (xgrammar's int32 layout) as a [B, V] bool mask;
bad_word_bans: the tokens bad_words forbid next;
logprob_entries: {token: logprob} of the top-N plus the chosen token, and the chosen token's rank;
token_logprob: log_softmax(logits)[row, token] per row (one Triton pass on CUDA).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rapid.worker.exponential_race import triton_available

__all__ = [
    "apply_penalties", "apply_top_k_top_p", "bad_word_bans", "logprob_entries", "mix_seed", "token_logprob",
    "unpack_bitmask",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, step: int) -> int:
    """The noise key of request seed ``seed`` at step ``step``: a fixed hash in [0, 2**63) (exponential_race hashes
    it with each token id)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[B, W] int32 (bit j of word w allows token 32 w + j) -> [B, V] bool, True = allowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def bad_word_bans(bad_words_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[int]) -> list[int]:
    """vLLM's rule: the last token of a banned sequence is forbidden when the output ends with the rest of it."""
    banned = []
    for seq in bad_words_token_ids:
        prefix = list(seq[:-1])
        if not prefix or (len(output_token_ids) >= len(prefix) and list(output_token_ids[-len(prefix):]) == prefix):
            banned.append(seq[-1])
    return banned


def logprob_entries(logprobs: Tensor, chosen: Tensor, nums: Sequence[int | None]
                    ) -> tuple[list[dict[int, float] | None], list[int]]:
    """logprobs [R, V] (log_softmax), chosen [R] token ids, nums: top-N per row (None: row skipped).

    Per row: {token: logprob} with the top-N (descending) then the chosen token when not among them, and
    the chosen token's 1-based rank (tokens with a logprob >= its own, as vLLM counts; 0 for skipped rows).
    """
    R, V = logprobs.shape
    if R == 0:
        return [], []
    k = min(max((n for n in nums if n is not None), default=0), V)
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [R, 1]
    ranks = (logprobs >= chosen_lp).sum(dim=-1).tolist()
    top_lp = top_ids = None
    if k > 0:
        top = torch.topk(logprobs, k, dim=-1)
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()
    chosen_list, chosen_lp_list = chosen.tolist(), chosen_lp[:, 0].tolist()
    entries: list[dict[int, float] | None] = []
    out_ranks: list[int] = []
    for i, n in enumerate(nums):
        if n is None:
            entries.append(None)
            out_ranks.append(0)
            continue
        d = dict(zip(top_ids[i][:n], top_lp[i][:n])) if n > 0 and top_ids is not None else {}
        d.setdefault(chosen_list[i], chosen_lp_list[i])
        entries.append(d)
        out_ranks.append(ranks[i])
    return entries, out_ranks


def apply_penalties(
    logits: Tensor,
    output_counts: Tensor,
    prompt_mask: Tensor | None,
    repetition_penalty: Tensor | None,
    frequency_penalty: Tensor | None,
    presence_penalty: Tensor | None,
) -> Tensor:
    """Repetition, frequency and presence penalties on logits [B, V].

    output_counts: [B, V] occurrences of each token in the row's output; prompt_mask: [B, V]
    token occurs in the row's prompt (needed with repetition_penalty); the penalties are [B]
    float32, None when no row of the batch has one.

    May modify `logits` in place (callers pass a private copy); returns the result.
    Repetition (HF / vLLM): for tokens in the prompt or the output, positive logits are divided by
    the penalty and negative ones multiplied.  Frequency / presence (OpenAI / vLLM): subtract
    frequency_penalty * count and presence_penalty * (count > 0) over output tokens.
    """
    counts = output_counts  # [B, V]
    if repetition_penalty is not None:
        assert prompt_mask is not None
        seen = prompt_mask | (counts > 0)  # [B, V]
        pen = repetition_penalty[:, None].expand_as(logits)  # [B, V]
        pen = torch.where(seen, pen, torch.ones_like(pen))
        logits = torch.where(logits > 0, logits / pen, logits * pen)
    if frequency_penalty is not None:
        logits -= frequency_penalty[:, None] * counts
    if presence_penalty is not None:
        logits -= presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(
    logits: Tensor, top_k: Tensor | None, top_k_max: int, top_p: Tensor | None
) -> Tensor:
    """Mask (-inf) tokens outside top-k, then outside top-p of the renormalised rest. logits [B, V].

    top_k: [B] int64, V meaning off; top_k_max: the largest top_k < V (bounds the top-k pass).
    """
    V = logits.shape[-1]
    if top_p is None:
        assert top_k is not None and top_k_max > 0
        # Only top-k: threshold at the k-th largest value (ties at the threshold are kept).
        top_vals = torch.topk(logits, top_k_max, dim=-1).values  # [B, k_max]
        kth = top_vals.gather(1, (top_k - 1).clamp(max=top_k_max - 1)[:, None])  # [B, 1]
        kth = kth.masked_fill((top_k >= V)[:, None], float("-inf"))  # rows with top-k off
        return logits.masked_fill(logits < kth, float("-inf"))

    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    if top_k is not None:
        positions = torch.arange(V, device=logits.device)[None, :]  # [1, V]
        sorted_logits = sorted_logits.masked_fill(positions >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    cum_before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each position
    remove = cum_before >= top_p[:, None]  # keeps the smallest prefix with mass >= top_p
    remove[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def token_logprob(logits: Tensor, tokens: Tensor) -> Tensor:
    """logits [B, V] float32, tokens [B] int64 -> [B] log_softmax(logits)[row, tokens[row]]."""
    if logits.is_cuda and triton_available():
        from rapid.worker.token_logprob_kernel import token_logprob as one_pass

        return one_pass(logits, tokens)
    return logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)

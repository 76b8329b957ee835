"""Logit filters of the batched sampler (rapid.worker.sampler), on plain [B, V] tensors.

apply_penalties: repetition, frequency and presence penalties;
apply_top_k_top_p: the top-k / top-p masks (the only sort in the sampler).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_penalties", "apply_top_k_top_p"]


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

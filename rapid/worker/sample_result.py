"""A sampling step's result: SamplerOutput (on the host) and PendingSample (on its way there).

Split from rapid.worker.sampler, which re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplerOutput", "PendingSample"]


@dataclass
class SamplerOutput:
    """One step's result for B rows.

    token_ids:       sampled token per row.
    sampled_logprob: log_softmax(raw logits)[row, token] per row (for cumulative_logprob).
    logprobs:        per row, None if the row did not ask for logprobs, else
                     {token_id: logprob} with the top-N tokens of log_softmax(raw logits)
                     plus the sampled token (N + 1 entries when the sampled one is not in the top-N).
    ranks:           per row, the sampled token's 1-based rank in log_softmax(raw logits) (0 without logprobs).
    """

    token_ids: list[int]
    sampled_logprob: list[float]
    logprobs: list[dict[int, float] | None]
    ranks: list[int]


class PendingSample:
    """One step's sampled tokens, on their way to the host: `tokens` stays on the device (the next step may
    read it as input ids), the host copy is enqueued behind the step, and `result()` waits for that copy only,
    not for work enqueued later (the next step's forward pass)."""

    def __init__(self, tokens: Tensor, sampled_lp: Tensor, logprobs: list, ranks: list[int]):
        self.tokens = tokens  # [B] int64, on the logits' device
        self._logprobs, self._ranks = logprobs, ranks
        self._ready = None
        if tokens.is_cuda:
            self._tokens_host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._lp_host = torch.empty(sampled_lp.shape, dtype=sampled_lp.dtype, pin_memory=True)
            self._tokens_host.copy_(tokens, non_blocking=True)
            self._lp_host.copy_(sampled_lp, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._tokens_host, self._lp_host = tokens, sampled_lp

    def result(self) -> SamplerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        return SamplerOutput(token_ids=self._tokens_host.tolist(), sampled_logprob=self._lp_host.tolist(),
                             logprobs=self._logprobs, ranks=self._ranks)

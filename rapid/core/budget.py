"""The token budget of a step (hybrid) or a prefill launch, as a user may set it at run time."""

from __future__ import annotations


def check_token_budget(budget, limit: int) -> None:
    """A run-time token budget: a positive integer no larger than the configured max_num_batched_tokens."""
    if not isinstance(budget, int) or not 1 <= budget <= limit:
        raise ValueError(f"max_num_batched_tokens must be an integer in [1, {limit}] (the configured "
                         f"max_num_batched_tokens, which sizes the workers' graphs), got {budget!r}")

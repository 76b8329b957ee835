"""Request: one sequence's state inside the engine core (tokens, KV blocks, progress, timings)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rapid.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for prefill (also after preemption)
    RUNNING = "running"  # scheduled: prefilling or decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    block_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while tokens other than the last sampled one still need their KV computed."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    def append_token(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason ('stop' / 'length') if it ends the request."""
        now = time.time()
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        n = len(self.output_token_ids)
        if n >= self.params.min_tokens:
            if not self.params.ignore_eos and token_id in self.eos_token_ids:
                self.stop_reason = None
                return "stop"
            if token_id in self.params.stop_token_ids:
                self.stop_reason = token_id
                return "stop"
        if n >= self.params.max_tokens:
            return "length"
        return None

"""Request: one sequence's state, and the one state machine every mode shares.

    WAITING ──> PREFILLING ──> DECODING ──> FINISHED
       ^            │              │  ^
       │            │              │  └─ (the decode executor ended it itself: EOS, stop token, length)
       │            v              v
       │         STOPPING <─── (abort, stop string: the executor still holds the blocks;
       │            │           FINISHED once it lets go: PrefillDone / Dropped)
       └──── PREEMPTED <────── (pool short: recomputed from its tokens once the executor let go)

The finish rules (EOS, stop token ids, max_tokens, max_model_len) are written once, in
`append_token`; the engine core and the decode worker both use it. Stop strings need text, so
only the core's output processor checks them. Plain Python: no torch.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rapid.params import SamplingParams
from rapid.protocol.worker import SeqWork


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for prefill (also after preemption); holds no blocks
    PREFILLING = "prefilling"  # prompt chunks being computed
    DECODING = "decoding"  # resident on the decode executor, which steps it on its own
    STOPPING = "stopping"  # ended for the user; an executor still holds its blocks
    PREEMPTED = "preempted"  # to be recomputed once the decode executor dropped it
    FINISHED = "finished"

    @property
    def is_done(self) -> bool:
        """Ended for the user (its final delta has been produced or is being produced)."""
        return self in (RequestStatus.STOPPING, RequestStatus.FINISHED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None  # ends the request by length when reached (None: no limit here)
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    first_scheduled_time: float = 0.0  # wall clock of its first prefill batch (0: not yet scheduled)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    prompt_lane: str | None = None  # the lane of the prompt's first chunk: with prompt_logprobs, it gathers them

    def __post_init__(self) -> None:
        self.prompt_token_ids = truncated_prompt(self.prompt_token_ids, self.params)  # the edge may have done it

    def keeps_lane(self, lane: str, tokens_left: int) -> bool:
        """A chunk may go to `lane`: with prompt_logprobs, once the prompt has started (fewer than all its tokens
        left), only to its first chunk's lane (that worker process holds the logprobs of the positions before)."""
        started = tokens_left < self.num_tokens
        return self.params.prompt_logprobs is None or not started or self.prompt_lane in (None, lane)

    @property
    def is_preempted(self) -> bool:
        """Preempted and not yet in a batch again: dropped by the executor or about to be (PREEMPTED), or back in
        the queue (WAITING after a preemption)."""
        return self.status == RequestStatus.PREEMPTED or (self.status == RequestStatus.WAITING
                                                          and self.num_preemptions > 0)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_tokens(self) -> int | None:
        """params.max_tokens; None (no limit) means up to max_model_len."""
        mt = self.params.max_tokens
        if mt is None and self.max_model_len is not None:
            return max(self.max_model_len - len(self.prompt_token_ids), 1)
        return mt

    @property
    def max_total_tokens(self) -> int:
        mt = self.max_tokens
        return len(self.prompt_token_ids) + mt if mt is not None else (self.max_model_len or 1 << 62)

    def append_token(self, token_id: int, now: float | None = None) -> str | None:
        """Record a sampled token; return the finish reason ('stop' / 'length') if it ends the request."""
        now = time.time() if now is None else now
        self.output_token_ids.append(token_id)
        self.num_computed_tokens = self.num_tokens - 1  # the new token's KV is computed by the next step
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
        return "length" if self.reaches_length() else None

    def reaches_length(self, extra_tokens: int = 0) -> bool:
        """Its output has reached max_tokens or the sequence max_model_len, counting `extra_tokens` not yet
        appended (the decode worker looks one step ahead)."""
        n = len(self.output_token_ids) + extra_tokens
        return ((self.max_tokens is not None and n >= self.max_tokens)
                or (self.max_model_len is not None and self.num_tokens + extra_tokens >= self.max_model_len))


def truncated_prompt(ids: list[int], params: SamplingParams) -> list[int]:
    """The prompt the engine runs: its last truncate_prompt_tokens tokens when that is set."""
    k = params.truncate_prompt_tokens
    return ids[-k:] if k is not None and len(ids) > k else ids


def check_fits(who: str, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
               num_blocks: int, block_size: int) -> None:
    """Reject up front a request that can never run (ValueError naming `who`, e.g. "request 7", and the numbers).
    max_tokens None: up to max_model_len."""
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise ValueError(f"{who}: prompt ({num_prompt_tokens} tokens) leaves no room for output "
                             f"within max_model_len ({max_model_len})")
        max_tokens = max_model_len - num_prompt_tokens
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise ValueError(f"{who}: prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                         f"{total} exceeds max_model_len ({max_model_len})")
    need = -(-total // block_size)
    if need > num_blocks:
        raise ValueError(f"{who}: {total} tokens need {need} KV blocks but the whole pool has "
                         f"{num_blocks} (raise kv_cache_memory_bytes or lower max_tokens)")


def seq_work(req: Request, num_tokens: int, block_ids: list[int], start: int | None = None) -> SeqWork:
    """The forward-pass work of `num_tokens` new tokens of `req`, from `start` (default: its first uncomputed one;
    a prompt's next chunk sent behind one still computing starts after that one's tokens)."""
    start = req.num_computed_tokens if start is None else start
    end = start + num_tokens
    prompt, output = req.prompt_token_ids, req.output_token_ids
    if start >= len(prompt):  # a decode step or a recomputed output chunk: no copy of the whole sequence
        tokens = output[start - len(prompt) : end - len(prompt)]
    else:
        tokens = prompt[start:end] + output[: max(0, end - len(prompt))]
    return SeqWork(req.request_id, tokens, start, list(block_ids), end == len(prompt) + len(output), req.params,
                   len(output), prompt, output)


def lane_kept_for_prompt_logprobs(running: list[Request], lane: str, has_chunk) -> str | None:
    """The lane where a prompt_logprobs prompt part-way through must go on, when it is not `lane` and that lane may
    take its next chunk (`has_chunk(req, lane)`); None: no such prompt."""
    return next((r.prompt_lane for r in running if r.status == RequestStatus.PREFILLING and r.prompt_lane
                 and not r.keeps_lane(lane, 0) and has_chunk(r, r.prompt_lane)), None)

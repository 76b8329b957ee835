"""Continuous batching with chunked prefill and preemption by recompute (the hybrid scheduler).

Contract (shared with the rapid-mode core): `add_request`, `abort_request`, `schedule` -> a batch
of (request, num_new_tokens) chunks, decodes first, then `update` with the sampled tokens.
Plain Python: no tensors, testable alone with factory-built requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from rapid.config import SchedulerConfig
from rapid.runtime.block_manager import BlockManager
from rapid.runtime.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # new tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so its last row yields the next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes (one token) first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decodes(self) -> int:
        """Requests generating their next output token (a one-token prompt chunk is not one)."""
        return sum(1 for c in self.chunks if c.num_tokens == 1 and c.request.output_token_ids)


def check_fits(req: Request, config: SchedulerConfig, blocks: BlockManager) -> None:
    """Reject up front a request that can never run (ValueError naming the numbers)."""
    total = req.max_total_tokens
    if total > config.max_model_len:
        raise ValueError(
            f"request {req.request_id}: prompt ({len(req.prompt_token_ids)} tokens) + max_tokens "
            f"({req.params.max_tokens}) = {total} exceeds max_model_len ({config.max_model_len})"
        )
    if blocks.blocks_needed(total) > blocks.num_blocks:
        raise ValueError(
            f"request {req.request_id}: {total} tokens need {blocks.blocks_needed(total)} KV blocks but the "
            f"whole pool has {blocks.num_blocks} (raise kv_cache_memory_bytes or lower max_tokens)"
        )


def reserve_chunk(req: Request, blocks: BlockManager, budget: int) -> int | None:
    """Admit the next prompt chunk of a waiting request: take prefix-cache hits on its first schedule,
    then allocate blocks for up to `budget` new tokens. Returns the chunk size, or None (pool short)."""
    if not req.block_ids and req.num_computed_tokens == 0:
        cached = blocks.match_prefix(req)
        req.num_computed_tokens = cached
        if req.num_preemptions == 0:
            req.num_cached_tokens = cached
    n = min(req.num_tokens - req.num_computed_tokens, budget)
    if not blocks.allocate(req, req.num_computed_tokens + n):
        return None
    return n


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        """Change the per-step token budget at run time (a controller lever: how much prefill per step)."""
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.config = replace(self.config, max_num_batched_tokens=max_num_batched_tokens)

    def add_request(self, req: Request) -> None:
        check_fits(req, self.config, self.blocks)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, "abort")
        return req

    def finish(self, req: Request, reason: str) -> None:
        """End a request (stop, length, abort) and free its blocks."""
        if req.status == RequestStatus.FINISHED:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.blocks.free(req)
        del self.requests[req.request_id]

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        """Free the victim's blocks and requeue it at the front; it is recomputed from its tokens."""
        self.running.remove(victim)
        self.blocks.free(victim)
        victim.status = RequestStatus.WAITING
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        # 1. Running requests, decodes before unfinished prefills; the newest are preempted first.
        queue = sorted(self.running, key=lambda r: r.is_prefilling)
        while queue and budget > 0:
            req = queue.pop(0)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = next((r for r in reversed(self.running) if r.request_id not in scheduled and r is not req), None)
                if victim is None:
                    self._preempt(req, out)
                    break
                if victim in queue:
                    queue.remove(victim)
                self._preempt(victim, out)
            else:
                out.chunks.append(ScheduledChunk(req, n))
                scheduled.add(req.request_id)
                budget -= n
        # 2. Waiting requests, first come first served, while the budget and the pool allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            n = reserve_chunk(req, self.blocks, budget)
            if n is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            scheduled.add(req.request_id)
            budget -= n
        out.chunks.sort(key=lambda c: c.num_tokens != 1)  # decodes (single-token rows) first
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[tuple[Request, str]]:
        """Advance computed tokens, append sampled tokens; return (request, reason) of those that finished."""
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            samples = chunk.samples
            req.num_computed_tokens += chunk.num_tokens
            self.blocks.commit(req)
            if not samples:
                continue
            reason = req.append_token(sampled[req.request_id])
            if reason is None and req.num_tokens >= self.config.max_model_len:
                reason = "length"
            if reason is not None:
                self.finish(req, reason)
                finished.append((req, reason))
        return finished

"""Room at admission. GrowthReserve (SchedulerConfig.admission_reserve): the KV blocks the running requests are still
expected to take, so that a request is admitted only when what stays free holds theirs and its own. `fits_hand_off`
(disagg): room in the decode pool for every prompt that will be handed off to it."""

from __future__ import annotations

import math

from rapid.core.block_manager import BlockManager
from rapid.core.request import Request, RequestStatus


class GrowthReserve:
    def __init__(self, share: float, blocks: BlockManager, max_model_len: int):
        self.share = share  # of each request's max_tokens expected to be generated
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.expected: dict[str, int] = {}  # admitted request id -> blocks it is expected to hold at most

    def expected_blocks(self, req: Request) -> int:
        """Its prompt (and outputs so far) plus `share` of its max_tokens, in blocks."""
        tokens = len(req.prompt_token_ids) + math.ceil(self.share * (req.max_tokens or 0))
        tokens = min(max(tokens, req.num_tokens), req.max_total_tokens, self.max_model_len)
        return self.blocks.blocks_needed(tokens)

    def to_come(self, req: Request) -> int:
        """Blocks an admitted request is still expected to take."""
        return max(0, self.expected.get(req.request_id, 0) - len(self.blocks.block_table(req.request_id)))

    def reserved(self, running: list[Request]) -> int:
        return sum(map(self.to_come, running))

    def admits(self, req: Request, reserved: int) -> bool:
        """After its first chunk's blocks are allocated: whether the free blocks still hold `reserved` and what
        `req` is expected to take; if so it is recorded as admitted."""
        expected = self.expected_blocks(req)
        if self.blocks.num_free_blocks < reserved + max(0, expected - len(self.blocks.block_table(req.request_id))):
            return False
        self.expected[req.request_id] = expected
        return True

    def forget(self, request_id: str) -> None:
        self.expected.pop(request_id, None)


def fits_hand_off(decode_blocks: BlockManager, running: list[Request], req: Request) -> bool:
    """Disagg: whether the decode pool's free blocks hold the KV of every prompt still prefilling (of `running`) and
    of `req`'s, as each will be copied there at hand-off. A prompt admitted past that finds no room when it is done and is
    recomputed later: on a small decode pool that was most of disagg's preemptions (344 against 10 for rapid in one
    40-request CPU run, session 35)."""
    prefilling = [r for r in running if r.status == RequestStatus.PREFILLING]
    need = sum(decode_blocks.blocks_needed(r.num_tokens) for r in (*prefilling, req))
    return decode_blocks.num_free_blocks >= need

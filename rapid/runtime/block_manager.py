"""KV block accounting: reference counts, free list, and prefix caching by a hash chain over full blocks.

The block manager owns no tensors: it hands out block ids of the pool that the workers own.
A full block's hash is hash((hash of the previous block, its token ids)), so equal hashes mean
equal prefixes. Freed blocks keep their hash and stay findable until they are reused (LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from rapid.runtime.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV pool has {num_blocks} blocks; at least 1 is needed (raise the KV memory)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}
        self.request_hashes: dict[str, list[int]] = {}  # hashes of each request's committed full blocks

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Give a request with no blocks the cached blocks of its longest cached prefix; return its tokens.

        At least one token is always left to compute, so the step that finishes the prompt has logits.
        """
        assert not req.block_ids, "match_prefix on a request that already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        tokens = req.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hashes: list[int] = []
        prev = 0
        for i in range(max_blocks):
            h = hash((prev, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hashes.append(h)
            self._take(block)
            req.block_ids.append(block)
            prev = h
        self.request_hashes[req.request_id] = hashes
        return len(hashes) * self.block_size

    def commit(self, req: Request) -> None:
        """Register the hashes of the request's full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self.request_hashes.setdefault(req.request_id, [])
        tokens = req.all_token_ids
        num_full = min(req.num_computed_tokens, len(tokens)) // self.block_size
        prev = hashes[-1] if hashes else 0
        for i in range(len(hashes), num_full):
            h = hash((prev, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
            block = req.block_ids[i]
            hashes.append(h)
            if h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
            prev = h

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow the request's blocks to hold num_tokens tokens. False (and no change) if the pool is short."""
        need = self.blocks_needed(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            req.block_ids.append(self._take_fresh())
        return True

    def free(self, req: Request) -> None:
        """Drop the request's references; blocks that reach zero go to the free list's end (LRU)."""
        for block in reversed(req.block_ids):  # tail blocks first: they are the least reusable
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        req.block_ids = []
        self.request_hashes.pop(req.request_id, None)

    def _take(self, block: int) -> None:
        """Add a reference to a block (a prefix-cache hit keeps the block's hash)."""
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _take_fresh(self) -> int:
        """The least recently freed block, its old hash evicted from the prefix cache."""
        block = next(iter(self.free_blocks))
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self._take(block)
        return block

"""KV block accounting: block tables, reference counts, free list, and prefix caching by a hash chain.

The block manager owns every request's block table (request id -> block ids) and no tensors: the
ids index the pool that the workers own. A full block's hash is hash((hash of the previous block,
its token ids)), so equal hashes mean equal prefixes. Freed blocks keep their hash and stay findable
until they are reused (LRU). Plain Python: no torch.
"""

from __future__ import annotations

from collections import OrderedDict


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
        self.tables: dict[str, list[int]] = {}  # request id -> its blocks, in token order
        self.committed: dict[str, list[int]] = {}  # request id -> hashes of its committed full blocks

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def has_room(self, request_id: str, num_tokens: int) -> bool:
        """The request's blocks already hold num_tokens tokens."""
        return len(self.block_table(request_id)) * self.block_size >= num_tokens

    # -- prefix cache ----------------------------------------------------------------------
    def _chain(self, tokens: list[int], num_blocks: int, start_hashes: list[int]):
        """Yield (block index, hash) of full blocks after the given hashes, up to num_blocks."""
        prev = start_hashes[-1] if start_hashes else 0
        bs = self.block_size
        for i in range(len(start_hashes), num_blocks):
            prev = hash((prev, tuple(tokens[i * bs : (i + 1) * bs])))
            yield i, prev

    def match_prefix(self, request_id: str, tokens: list[int]) -> int:
        """Give a request with no blocks the cached blocks of its longest cached prefix; return its tokens.

        At least one token is always left to compute, so the step that finishes the prompt has logits.
        """
        if self.tables.get(request_id):
            raise RuntimeError(f"match_prefix on request {request_id}, which already holds blocks")
        table: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            for _, h in self._chain(tokens, (len(tokens) - 1) // self.block_size, []):
                block = self.hash_to_block.get(h)
                if block is None:
                    break
                self._take(block)
                table.append(block)
                hashes.append(h)
        self.tables[request_id] = table
        self.committed[request_id] = hashes
        return len(table) * self.block_size

    def commit(self, request_id: str, tokens: list[int], num_computed_tokens: int) -> None:
        """Register the hashes of the request's full blocks whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self.committed.setdefault(request_id, [])
        table = self.tables[request_id]
        num_full = min(num_computed_tokens, len(tokens), len(table) * self.block_size) // self.block_size
        for i, h in self._chain(tokens, num_full, hashes):
            hashes.append(h)
            if h not in self.hash_to_block:
                self.block_hash[table[i]] = h
                self.hash_to_block[h] = table[i]

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold num_tokens tokens; return the new blocks ([] if none were needed),
        or None (and no change) if the pool is short."""
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return []
        if need > self.num_free_blocks:
            return None
        new = [self._take_fresh() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Drop the request's references; blocks that reach zero go to the free list's end (LRU)."""
        self.release(self.detach(request_id))

    def detach(self, request_id: str) -> list[int]:
        """Take the request's table out (its references stay held) for a later `release`."""
        self.committed.pop(request_id, None)
        return self.tables.pop(request_id, [])

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # tail blocks first: they are the least reusable
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None

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

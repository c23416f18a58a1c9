"""Maps requests onto the block pool: prefix-cache lookup, slot allocation, publishing, freeing."""

from __future__ import annotations

from tandem.engine.block_pool import BlockPool, KVBlock
from tandem.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Cached blocks matching the request's leading full blocks.

        The last prompt token is always recomputed (its logits start the output), so a prompt
        that is entirely cached still leaves at least one token to run.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        return self.pool.find_cached_blocks(request.block_hashes[:max_blocks])

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None
    ) -> bool:
        """Give the request blocks for ``num_new_tokens`` more tokens (after any cache hits).

        Returns False, changing nothing, when the pool cannot supply them.
        """
        hits = new_computed_blocks or []
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        blocks_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, blocks_needed - len(request.block_table) - len(hits))
        # Hits sitting in the free list stop being allocatable once we reference them.
        num_evictable_hits = sum(1 for block in hits if block.ref_count == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_evictable_hits:
            return False
        if hits:
            self.pool.touch(hits)
            request.block_table.extend(hits)
            request.num_registered_blocks = len(request.block_table)
            request.num_computed_tokens = num_computed
        if num_new_blocks:
            request.block_table.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Publish blocks whose KV has just been fully computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        start = request.num_registered_blocks
        if num_full <= start:
            return
        bs = self.block_size
        self.pool.cache_full_blocks(
            request.block_table[start:num_full],
            request.block_hashes[start:num_full],
            request.all_token_ids[start * bs : num_full * bs],
            request.block_hashes[start - 1] if start else None,
            request.hash_seed,
        )
        request.num_registered_blocks = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so shared prefixes are evicted last."""
        self.pool.free(list(reversed(request.block_table)))
        request.block_table = []
        request.num_registered_blocks = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

"""What a tier keeps about a block besides its bytes: enough to place it in a prefix chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tandem.protocols.kv_events import BlockRemoved, BlockStored, KVEvent

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVBlock


@dataclass(slots=True)
class BlockMeta:
    """A full KV block: its sequence hash, the hash of the block before it (None at a sequence's
    start), the hash seed (salt) it was hashed with, its tokens, and how often it was used."""

    block_hash: int
    parent_hash: int | None
    hash_seed: int
    token_ids: tuple[int, ...]
    frequency: int = 1
    """Times the block was stored or hit in any tier; the disk filter reads it."""


def block_meta(block: KVBlock) -> BlockMeta:
    """A cached pool block's metadata; its frequency counts the store and every prefix hit."""
    assert block.block_hash is not None
    return BlockMeta(block.block_hash, block.parent_hash, block.hash_seed, block.token_ids, 1 + block.num_hits)


def stored_events(metas: list[BlockMeta], block_size: int, medium: str) -> list[KVEvent]:
    """``BlockStored`` events for ``metas`` in order, one event per run of blocks that chain
    (each the parent of the next), so a router can re-hash each run from its parent."""
    events: list[KVEvent] = []
    run: list[BlockMeta] = []
    for meta in metas:
        if run and meta.parent_hash != run[-1].block_hash:
            events.append(_stored(run, block_size, medium))
            run = []
        run.append(meta)
    if run:
        events.append(_stored(run, block_size, medium))
    return events


def _stored(run: list[BlockMeta], block_size: int, medium: str) -> BlockStored:
    tokens: list[int] = []
    for meta in run:
        tokens.extend(meta.token_ids)
    return BlockStored(
        block_hashes=[m.block_hash for m in run],
        parent_block_hash=run[0].parent_hash,
        token_ids=tokens,
        block_size=block_size,
        medium=medium,
    )


def removed_event(hashes: list[int], medium: str) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium=medium)


def parents_first(metas: list[BlockMeta]) -> list[BlockMeta]:
    """Order blocks so that each one's parent (when present) comes before it."""
    by_hash = {m.block_hash: m for m in metas}
    done: set[int] = set()
    out: list[BlockMeta] = []
    for meta in metas:
        chain: list[BlockMeta] = []
        node: BlockMeta | None = meta
        while node is not None and node.block_hash not in done:
            chain.append(node)
            done.add(node.block_hash)
            node = by_hash.get(node.parent_hash) if node.parent_hash is not None else None
        out.extend(reversed(chain))
    return out

"""KV tiers in the router's index: which tier an event's ``medium`` names, who holds a block in
each tier, and a match's blocks counted by the best tier holding each.

Tiers, as NVIDIA Dynamo's ``StorageTier::from_kv_medium`` maps them (case-insensitive):
G1 **device** (the engine's own pool: ``None``, ``GPU``, ``DEVICE``), G2 **host** memory (``CPU``,
``CPU_PINNED``), G3 **disk** (``DISK``, ``NVME``; vLLM spells it ``Disk``). Any other medium names
no tier and its events are skipped.

A *holder* has one :class:`TierBlocks` per tier it can hold blocks in: a worker has three; a
node-wide host tier (a pseudo-holder shared by the workers of one machine, named in their cards'
``kv_node_tier``) has one, its host tier. The holders of a block in one tier are a bitmask in that
tier's ``seq hash -> mask`` dict; workers and node tiers take their bits from one bit space.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tandem.protocols.kv_events import MEDIUM_CPU, MEDIUM_DISK, MEDIUM_GPU

__all__ = [
    "DEVICE",
    "DISK",
    "HOST",
    "MEDIUM_TIERS",
    "NodeTier",
    "Tier",
    "TierBlocks",
    "TieredMatch",
    "WorkerHolder",
    "match_tiers",
    "tier_index",
    "tier_of_medium",
]


DEVICE, HOST, DISK = 0, 1, 2
"""The tiers as plain ints, for the hot paths (looking up an enum member costs ~0.1 us)."""


class Tier(enum.IntEnum):
    """A KV tier; the value indexes a holder's tiers and the index's per-tier masks."""

    DEVICE = DEVICE
    HOST = HOST
    DISK = DISK


MEDIUM_TIERS: dict[str | None, int] = {
    None: DEVICE,
    MEDIUM_GPU: DEVICE,
    "DEVICE": DEVICE,
    MEDIUM_CPU: HOST,
    "CPU_PINNED": HOST,
    MEDIUM_DISK: DISK,
    "NVME": DISK,
    "STORAGE": DISK,  # vLLM's name for its offloading connector's storage tier
}
"""Medium -> tier as engines spell them; :func:`tier_index` also takes other cases."""


def tier_index(medium: str | None) -> int | None:
    """The tier (as an int) an event's ``medium`` names, case-insensitive; None for an unknown one."""
    tier = MEDIUM_TIERS.get(medium)
    if tier is None and isinstance(medium, str):
        tier = MEDIUM_TIERS.get(medium.upper())
    return tier


def tier_of_medium(medium: str | None) -> Tier | None:
    """The tier an event's ``medium`` names (case-insensitive); None for an unknown medium."""
    tier = tier_index(medium)
    return None if tier is None else Tier(tier)


class TieredMatch(NamedTuple):
    """One worker's match: the leading run of the request's blocks it holds in any tier, counted
    by the best tier holding each block (device over host over disk). A tuple: the router makes
    one per matching worker per request."""

    device: int
    host: int
    disk: int

    @property
    def depth(self) -> int:
        """Leading blocks held in some tier."""
        return self.device + self.host + self.disk

    def credit(self, host_credit: float, disk_credit: float) -> float:
        """Blocks credited: a device block counts 1, a host block ``host_credit``, a disk block
        ``disk_credit``."""
        return self.device + host_credit * self.host + disk_credit * self.disk


class TierBlocks:
    """One holder's blocks in one tier: engine hash -> router seq hash, and a ref count per seq hash.

    Two engine hashes can map to one router seq hash (e.g. an engine that salts its own hashes
    while events carry no salt), so the holder holds a seq hash while any of them is stored.
    ``bit`` is the holder's bit in ``masks``, its tier's ``seq hash -> holder bitmask`` dict.
    """

    __slots__ = ("bit", "by_engine", "masks", "refs")

    def __init__(self, bit: int, masks: dict[int, int]) -> None:
        self.bit = bit
        self.masks = masks
        self.by_engine: dict[int, int] = {}
        self.refs: dict[int, int] = {}

    def store(self, engine_hashes: list[int], seq_hashes: list[int]) -> None:
        """Hold ``seq_hashes[i]`` under ``engine_hashes[i]`` (re-mapping an engine hash reported
        before with other tokens)."""
        by_engine, refs, masks, bit = self.by_engine, self.refs, self.masks, self.bit
        for engine_hash, seq_hash in zip(engine_hashes, seq_hashes, strict=True):
            old = by_engine.get(engine_hash)
            if old is not None:
                if old == seq_hash:
                    continue  # a repeated report of the same block
                self.release(old)
            by_engine[engine_hash] = seq_hash
            count = refs.get(seq_hash, 0)
            refs[seq_hash] = count + 1
            if not count:
                masks[seq_hash] = masks.get(seq_hash, 0) | bit

    def release(self, seq_hash: int) -> None:
        """Drop one reference to ``seq_hash``; the last one clears the holder's bit (and the
        block's entry when no holder is left)."""
        count = self.refs[seq_hash] - 1
        if count:
            self.refs[seq_hash] = count
            return
        del self.refs[seq_hash]
        mask = self.masks[seq_hash] & ~self.bit
        if mask:
            self.masks[seq_hash] = mask
        else:
            del self.masks[seq_hash]

    def clear(self) -> None:
        """Drop every block of this holder in this tier."""
        masks, keep = self.masks, ~self.bit
        for seq_hash in self.refs:
            mask = masks[seq_hash] & keep
            if mask:
                masks[seq_hash] = mask
            else:
                del masks[seq_hash]
        self.by_engine.clear()
        self.refs.clear()


class NodeTier:
    """A node-wide host tier: its blocks, and the workers (a bitmask) whose cards name it."""

    __slots__ = ("blocks", "members", "name")

    def __init__(self, name: str, blocks: TierBlocks) -> None:
        self.name = name
        self.blocks = blocks
        self.members = 0


class WorkerHolder:
    """A worker's blocks in each tier (indexed by :class:`Tier`) and its node-wide host tier."""

    __slots__ = ("bit", "node", "tiers")

    def __init__(self, bit: int, masks: tuple[dict[int, int], dict[int, int], dict[int, int]]) -> None:
        self.bit = bit
        self.tiers = tuple(TierBlocks(bit, tier_masks) for tier_masks in masks)
        self.node: NodeTier | None = None

    @property
    def by_engine(self) -> dict[int, int]:
        """The device tier's engine hash -> seq hash map."""
        return self.tiers[DEVICE].by_engine

    def target(self, tier: int) -> TierBlocks:
        """Where an event of this worker naming ``tier`` applies: a host event of a worker on a
        node-wide host tier goes to that tier."""
        if tier == HOST and self.node is not None:
            return self.node.blocks
        return self.tiers[tier]

    def resolve_parent(self, first: TierBlocks, engine_hash: int) -> int | None:
        """The seq hash of a parent engine hash: in ``first`` (the event's own tier), then this
        worker's other tiers (device, host, disk), then its node-wide host tier."""
        seq_hash = first.by_engine.get(engine_hash)
        if seq_hash is not None:
            return seq_hash
        for blocks in self.tiers:
            if blocks is not first and (seq_hash := blocks.by_engine.get(engine_hash)) is not None:
                return seq_hash
        node = self.node
        if node is not None and node.blocks is not first:
            return node.blocks.by_engine.get(engine_hash)
        return None


Masks = tuple[int, int, int]
"""Per tier, the workers whose best tier for a block it is (device, host-only, disk-only)."""
_NONE: Masks = (0, 0, 0)
_COUNT_BITS = 40  # a request's blocks, far more than any context length
_COUNT_MASK = (1 << _COUNT_BITS) - 1


def match_tiers(
    seq_hashes: Sequence[int],
    masks: tuple[dict[int, int], dict[int, int], dict[int, int]],
    node_bits: int,
    expand: Callable[[int], int],
    by_index: list[str | None],
) -> dict[str, TieredMatch]:
    """Each worker's leading blocks held in some tier, counted by the best tier holding each.

    ``masks`` are the index's per-tier holder masks; host masks with ``node_bits`` go through
    ``expand`` (node tier -> its members). Consecutive blocks mostly have the same masks, so the
    walk compares each block's with the previous one's and only where the best-tier masks change
    does it close the spans of the workers that leave a tier (as bitmasks, not worker by worker).
    """
    device, host, disk = masks[0].get, masks[1].get, masks[2].get
    spans = _Spans()
    current = _NONE
    candidates = -1  # the workers holding every block so far, in some tier (-1: all)
    d_raw = h_raw = k_raw = -1  # the previous block's masks as stored
    position = 0
    for position, seq_hash in enumerate(seq_hashes):
        d, h, k = device(seq_hash, 0), host(seq_hash, 0), disk(seq_hash, 0)
        if d == d_raw and h == h_raw and k == k_raw:
            continue
        d_raw, h_raw, k_raw = d, h, k
        if not candidates & ~d:  # every worker still matching has it on device
            best = (candidates, 0, 0)
        else:
            if h & node_bits:
                h = expand(h)
            candidates &= d | h | k
            best = (d & candidates, h & ~d & candidates, k & ~(d | h) & candidates)
        if best != current:
            spans.move(current, best, position)
            current = best
        if not candidates:
            break
    else:
        position = len(seq_hashes)
    spans.move(current, _NONE, position)
    return spans.matches(by_index)


class _Spans:
    """Which workers count blocks in which tier since when, as bitmasks: open spans per tier
    (workers, first block), closed ones (tier, workers, blocks)."""

    __slots__ = ("closed", "open")

    def __init__(self) -> None:
        self.open: tuple[list[tuple[int, int]], ...] = ([], [], [])
        self.closed: list[tuple[int, int, int]] = []

    def move(self, old: Masks, new: Masks, position: int) -> None:
        """At block ``position`` the best-tier masks go from ``old`` to ``new``."""
        for tier in (DEVICE, HOST, DISK):
            left, entered = old[tier] & ~new[tier], new[tier] & ~old[tier]
            if left:
                still: list[tuple[int, int]] = []
                for workers, since in self.open[tier]:
                    if workers & left:
                        self.closed.append((tier, workers & left, position - since))
                    if workers & ~left:
                        still.append((workers & ~left, since))
                self.open[tier][:] = still
            if entered:
                self.open[tier].append((entered, position))

    def matches(self, by_index: list[str | None]) -> dict[str, TieredMatch]:
        """Per worker, the blocks of its closed spans in each tier. Workers with equal counts (most
        of them, typically) share one immutable ``TieredMatch``."""
        packed: dict[int, int] = {}  # bit index -> its three counts, _COUNT_BITS bits each
        get = packed.get
        for tier, workers, blocks in self.closed:
            blocks <<= _COUNT_BITS * tier
            while workers:
                low = workers & -workers
                workers ^= low
                index = low.bit_length() - 1
                packed[index] = get(index, 0) + blocks
        made: dict[int, TieredMatch] = {}
        matches: dict[str, TieredMatch] = {}
        for index, counts in packed.items():
            worker = by_index[index]
            if worker is None:
                continue
            match = made.get(counts)
            if match is None:
                match = made[counts] = TieredMatch(
                    counts & _COUNT_MASK, (counts >> _COUNT_BITS) & _COUNT_MASK, counts >> (2 * _COUNT_BITS)
                )
            matches[worker] = match
        return matches

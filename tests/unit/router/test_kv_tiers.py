"""KV tiers in the router: medium → tier, per-tier holders, node-wide host tiers, tier credit in the
cost and the router, dumps with mixed mediums, and the flags that set the credits."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.cli.main import build_parser
from tandem.cli.router_cmd import router_config_from_args
from tandem.protocols.block_hash import block_hashes
from tandem.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, make_batch
from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.cost import KvCostConfig, select_worker, tier_credits, worker_costs
from tandem.router.kv.indexer import KvIndexer
from tandem.router.kv.tiers import Tier, TieredMatch, tier_of_medium
from tandem.router.policies.kv import KvRouter, KvRouterConfig
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.discovery.memory import MemoryDiscovery
from tandem.runtime.event_plane.zmq_publisher import BlockTable
from tandem.runtime.request_plane import RequestPlaneClient

BS = 4
T0, T1, T2 = (list(range(s, s + BS)) for s in (0, 100, 200))  # three blocks' tokens
H0, H1, H2 = block_hashes(T0 + T1 + T2, BS)  # their chained hashes (engine hashes = router hashes)
QUERY = [H0, H1, H2]


def stored(hashes: list[int], tokens: list[int], parent: int | None = None, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS, medium=medium)


def removed(hashes: list[int], medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes, medium=medium)


def m(device: int, host: int = 0, disk: int = 0) -> TieredMatch:
    return TieredMatch(device, host, disk)


# ---- medium → tier --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        (None, Tier.DEVICE),
        ("GPU", Tier.DEVICE),
        ("gpu", Tier.DEVICE),
        ("Device", Tier.DEVICE),
        ("CPU", Tier.HOST),
        ("cpu_pinned", Tier.HOST),
        ("DISK", Tier.DISK),
        ("Disk", Tier.DISK),  # vLLM's spelling
        ("NVME", Tier.DISK),
        ("STORAGE", Tier.DISK),  # vLLM 0.32's offloading connector's storage tier
        ("TAPE", None),
        ("", None),
    ],
)
def test_medium_maps_to_tier(medium: str | None, tier: Tier | None):
    assert tier_of_medium(medium) == tier


def test_each_medium_spelling_lands_in_its_tier():
    idx = KvIndexer(BS)
    idx.apply("w", stored([H0], T0, medium="gpu"))
    idx.apply("w", stored([H1], T1, parent=H0, medium="cpu_pinned"))
    idx.apply("w", stored([H2], T2, parent=H1, medium="Disk"))
    assert [idx.blocks_of("w", tier) for tier in Tier] == [1, 1, 1]
    assert idx.find_tiered_matches(QUERY) == {"w": m(1, 1, 1)}
    assert idx.stats.skipped_events == 0


def test_vllm_offloading_events_in_vllms_map_shape_land_in_host_and_storage_tiers():
    """What a vLLM worker with `kv_offloading_size` publishes: tagged maps (vLLM >= mid-2026),
    block hashes as 32-byte digests, medium CPU for host memory and STORAGE for its storage tier."""
    import msgspec

    from tandem.protocols.kv_events import decode_batch

    digests = [bytes([i]) * 32 for i in (1, 2, 3)]
    events = [
        {"type": "BlockStored", "block_hashes": [digests[0]], "parent_block_hash": None, "token_ids": T0,
         "block_size": BS, "medium": "GPU", "lora_name": None, "group_idx": 0},
        {"type": "BlockStored", "block_hashes": [digests[1]], "parent_block_hash": digests[0], "token_ids": T1,
         "block_size": BS, "medium": "CPU", "lora_name": None, "group_idx": 0},
        {"type": "BlockStored", "block_hashes": [digests[2]], "parent_block_hash": digests[1], "token_ids": T2,
         "block_size": BS, "medium": "STORAGE", "lora_name": None, "group_idx": 0},
    ]  # fmt: skip
    batch = decode_batch(msgspec.msgpack.encode([1.0, events, None]))
    idx = KvIndexer(BS)
    idx.apply_batch("vllm", batch)
    assert [idx.blocks_of("vllm", tier) for tier in Tier] == [1, 1, 1]
    assert idx.find_tiered_matches(QUERY) == {"vllm": m(1, 1, 1)}


# ---- per-tier holders -----------------------------------------------------------------------------


def test_a_block_moving_from_g1_to_g2_keeps_its_match_at_the_host_weight():
    idx = KvIndexer(BS)
    idx.apply("w", stored([H0, H1], T0 + T1))
    assert not idx.has_lower_tiers()
    assert idx.find_tiered_matches(QUERY) == {"w": m(2)}
    # Offload H1: the pool evicts it, the host tier stores it (its parent is still in G1).
    idx.apply_batch("w", [removed([H1]), stored([H1], T1, parent=H0, medium="CPU")])
    assert idx.stats.unknown_parents == 0
    assert idx.find_tiered_matches(QUERY) == {"w": m(1, 1)}
    assert idx.find_matches(QUERY) == {"w": 2}
    assert tier_credits(idx.find_tiered_matches(QUERY), KvCostConfig()) == {"w": 1.75}
    # H0 follows it down, then H1 goes on to disk.
    idx.apply_batch("w", [stored([H0], T0, medium="CPU"), removed([H0])])
    assert tier_credits(idx.find_tiered_matches(QUERY), KvCostConfig()) == {"w": 1.5}
    idx.apply_batch("w", [removed([H1], medium="CPU"), stored([H1], T1, parent=H0, medium="DISK")])
    assert idx.find_tiered_matches(QUERY) == {"w": m(0, 1, 1)}
    assert tier_credits(idx.find_tiered_matches(QUERY), KvCostConfig()) == {"w": 1.0}
    assert tier_credits(idx.find_tiered_matches(QUERY), KvCostConfig(host_credit=0.5, disk_credit=0.0)) == {"w": 0.5}


def test_the_best_tier_counts_and_a_block_evicted_from_every_tier_leaves_the_index():
    idx = KvIndexer(BS)
    idx.apply_batch("w", [stored([H0], T0), stored([H0], T0, medium="CPU"), stored([H0], T0, medium="DISK")])
    assert idx.find_tiered_matches(QUERY) == {"w": m(1)}  # held everywhere: credited as device
    assert idx.num_blocks() == 1 and [idx.num_blocks(tier) for tier in Tier] == [1, 1, 1]
    assert idx.blocks_of("w") == 1
    idx.apply("w", removed([H0]))
    assert idx.find_tiered_matches(QUERY) == {"w": m(0, 1)}
    idx.apply("w", removed([H0], medium="CPU"))  # removes from the host tier only
    assert idx.find_tiered_matches(QUERY) == {"w": m(0, 0, 1)}
    assert idx.num_blocks() == 1
    idx.apply("w", removed([H0], medium="DISK"))
    assert idx.num_blocks() == 0 and idx.blocks_of("w") == 0 and not idx.has_lower_tiers()
    assert idx.find_tiered_matches(QUERY) == {} and idx.find_matches(QUERY) == {}
    assert idx.stats.unknown_removals == 0


def test_a_workers_depth_runs_through_any_of_its_tiers_and_stops_at_a_gap():
    idx = KvIndexer(BS)
    idx.apply_batch("a", [stored([H0], T0, medium="DISK"), stored([H1, H2], T1 + T2, parent=H0)])
    idx.apply_batch("b", [stored([H0, H1], T0 + T1, medium="CPU")])
    idx.apply_batch("c", [stored([H0], T0), stored([H2], T2, parent=H1)])
    assert idx.stats.unknown_parents == 1  # c's parent is a's block, not c's
    assert idx.find_tiered_matches(QUERY) == {"a": m(2, 0, 1), "b": m(0, 2), "c": m(1)}
    assert idx.find_matches(QUERY) == {"a": 3, "b": 2, "c": 1}


def test_a_parent_is_looked_up_in_the_events_tier_first_then_the_workers_other_tiers():
    idx = KvIndexer(BS)
    other = list(range(500, 500 + BS))
    # Engine hash 7 names T0 in the pool and (reused) other tokens in host memory.
    idx.apply_batch("w", [stored([7], T0), stored([7], other, medium="CPU")])
    idx.apply("w", stored([8], T1, parent=7, medium="CPU"))  # its parent: the host tier's 7
    assert idx.find_tiered_matches(block_hashes(other + T1, BS)) == {"w": m(0, 2)}
    assert idx.find_tiered_matches(QUERY) == {"w": m(1)}
    idx.apply("w", stored([9], T1, parent=7, medium="DISK"))  # no disk 7: the pool's (device first)
    assert idx.find_tiered_matches(QUERY) == {"w": m(1, 0, 1)}


def test_all_blocks_cleared_and_removal_drop_every_tier_of_the_worker():
    idx = KvIndexer(BS)
    for worker in ("a", "b"):
        idx.apply_batch(worker, [stored([H0], T0), stored([H1], T1, parent=H0, medium="CPU")])
        idx.apply(worker, stored([H2], T2, parent=H1, medium="DISK"))
    assert idx.find_matches(QUERY) == {"a": 3, "b": 3}
    idx.apply("a", AllBlocksCleared())
    assert idx.find_tiered_matches(QUERY) == {"b": m(1, 1, 1)} and idx.blocks_of("a") == 0
    idx.remove_worker("b")
    assert idx.num_blocks() == 0 and idx.workers() == {"a"}


# ---- node-wide host tier --------------------------------------------------------------------------


def _node_index() -> KvIndexer:
    """a and b share node tier n1; c has a private host tier."""
    idx = KvIndexer(BS)
    idx.set_node_tier("a", "n1")
    idx.set_node_tier("b", "n1")
    idx.set_node_tier("c", None)  # no-op: c is not registered by it
    assert idx.workers() == {"a", "b"} and idx.node_tier_of("a") == "n1"
    return idx


def test_a_block_one_worker_puts_in_the_node_tier_counts_for_its_neighbours():
    idx = _node_index()
    idx.apply_batch("a", [stored([H0], T0), stored([H0], T0, medium="CPU")])  # G1 and a G2 copy
    idx.apply("a", stored([H1], T1, parent=H0, medium="CPU"))
    idx.apply("b", stored([H2], T2, parent=H1, medium="CPU"))  # parent from the node tier
    idx.apply("c", stored([H0, H1], T0 + T1, medium="CPU"))  # private: for c only
    assert idx.stats.unknown_parents == 0
    assert idx.find_tiered_matches(QUERY) == {"a": m(1, 2), "b": m(0, 3), "c": m(0, 2)}
    # The node tier's blocks count for b, but are not b's own.
    assert idx.blocks_of("b", Tier.HOST) == 3 and idx.blocks_of("b") == 0
    # b reports the removal of a block that a stored; a's AllBlocksCleared leaves the node tier.
    idx.apply("b", removed([H1], medium="CPU"))
    assert idx.stats.unknown_removals == 0
    assert idx.find_tiered_matches(QUERY) == {"a": m(1), "b": m(0, 1), "c": m(0, 2)}
    idx.apply("b", stored([H1], T1, parent=H0, medium="CPU"))
    idx.apply("a", stored([H1], T1, parent=H0, medium="CPU"))  # a repeated report changes nothing
    idx.apply("a", AllBlocksCleared())
    assert idx.find_tiered_matches(QUERY) == {"a": m(0, 3), "b": m(0, 3), "c": m(0, 2)}
    # The node tier stays while a member is left, and goes with the last one.
    idx.remove_worker("a")
    assert idx.find_tiered_matches(QUERY) == {"b": m(0, 3), "c": m(0, 2)}
    idx.remove_worker("b")
    idx.remove_worker("c")
    assert idx.num_blocks() == 0 and idx.workers() == set() and not idx.has_lower_tiers()


def test_a_worker_joining_later_or_moving_sees_only_its_node_tiers_blocks():
    idx = _node_index()
    idx.apply("a", stored([H0], T0, medium="CPU"))
    idx.set_node_tier("d", "n1")
    assert idx.find_matches(QUERY) == {"a": 1, "b": 1, "d": 1}
    idx.set_node_tier("d", "n2")
    idx.set_node_tier("b", None)
    assert idx.find_matches(QUERY) == {"a": 1}
    idx.set_node_tier("a", "n2")  # n1 loses its last member: its blocks go
    assert idx.num_blocks() == 0
    # The freed bits are reused without leaking membership.
    idx.apply("e", stored([H0], T0, medium="CPU"))
    assert idx.find_matches(QUERY) == {"e": 1}


def test_the_router_puts_workers_in_their_cards_node_tier():
    pool = WorkerPool(MemoryDiscovery())
    router = KvRouter(pool, RequestPlaneClient(), KvRouterConfig(seed=0, block_size=BS))
    cards = [_card("a", "host-1/seg"), _card("b", "host-1/seg"), _card("c", None)]
    for card in cards:
        router._on_added(card)
    router.indexer.apply("a", stored([H0], T0, medium="CPU"))
    assert router.indexer.find_matches(QUERY) == {"a": 1, "b": 1}
    router._on_removed(cards[0])
    router._on_removed(cards[1])
    assert router.indexer.num_blocks() == 0


# ---- credit in the cost and the router ------------------------------------------------------------


def test_at_equal_load_device_hits_beat_host_hits():
    idx = KvIndexer(BS)
    idx.apply("dev", stored([H0, H1, H2], T0 + T1 + T2))
    idx.apply("host", stored([H0, H1, H2], T0 + T1 + T2, medium="CPU"))
    config = KvCostConfig(prefill_load_scale=1.0)
    credits = tier_credits(idx.find_tiered_matches(QUERY), config)
    assert credits == {"dev": 3.0, "host": 2.25}
    costs = worker_costs({"dev": (0, 0), "host": (0, 0), "none": (0, 0)}, 3 * BS, credits, BS, config)
    assert costs == {"dev": 0.0, "host": 0.75, "none": 3.0}
    assert select_worker(costs, 0.0, random.Random(0)) == "dev"


def test_the_router_credits_tiers_and_counts_device_hits_only_in_its_hit_rate():
    router = KvRouter(WorkerPool(MemoryDiscovery()), RequestPlaneClient(), KvRouterConfig(seed=0, block_size=BS))
    cards = [_card(w, None) for w in ("dev", "host")]
    prompt = T0 + T1 + T2
    router.indexer.apply("dev", stored([H0], T0))
    router.indexer.apply("host", stored([H0, H1, H2], prompt, medium="CPU"))
    # dev: 1 block at 1.0; host: 3 blocks at 0.75 = 2.25 credited blocks, and its booked prefill
    # spares them (9 of 12 tokens).
    assert router.route(cards, prompt, "r", None).worker_id == "host"
    assert router.load.prefill_tokens("host") == 3
    status = router.status(cards)
    assert status["cached_blocks"] == 0 and status["host_matched_blocks"] == 3 and status["hit_rate"] == 0.0
    assert status["host_credit"] == 0.75 and status["disk_credit"] == 0.25
    assert status["workers"]["host"]["blocks_by_tier"] == {"device": 0, "host": 3, "disk": 0}
    router.on_finished("r")
    router.indexer.apply("dev", stored([H1, H2], T1 + T2, parent=H0))
    assert router.route(cards, prompt, "r2", None).worker_id == "dev"
    assert router.cached_blocks == 3 and router.hit_rate == 0.5


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True])
def test_tier_credits_must_be_finite_and_non_negative(value: float):
    with pytest.raises(ValueError, match="host_credit"):
        KvCostConfig(host_credit=value)
    with pytest.raises(ValueError, match="disk_credit"):
        KvCostConfig(disk_credit=value)
    with pytest.raises(ValueError, match="host_credit"):
        KvRouterConfig(host_credit=value)


def test_router_flags_set_the_tier_credits():
    args = build_parser().parse_args(["router", "--kv-host-credit", "0.5", "--kv-disk-credit", "0.125"])
    config = router_config_from_args(args)
    assert (config.host_credit, config.disk_credit) == (0.5, 0.125)
    defaults = router_config_from_args(build_parser().parse_args(["router"]))
    assert (defaults.host_credit, defaults.disk_credit) == (0.75, 0.25)


# ---- dumps ----------------------------------------------------------------------------------------


def test_a_dump_with_mixed_mediums_rebuilds_the_per_tier_state():
    events = [
        stored([H0, H1], T0 + T1),
        stored([H1], T1, parent=H0, medium="CPU"),  # write-through copy of H1
        removed([H1]),
        removed([H0]),
        stored([H0], T0),  # H0 back in the pool: now after its host child in insertion order
        stored([H2], T2, parent=H1, medium="Disk"),
        stored([H2], T2, parent=H1, medium="CPU"),
        removed([H2], medium="cpu"),
    ]
    table = BlockTable()
    table.apply(make_batch(events))
    dump = table.as_events()
    listed: set[int] = set()
    for event in dump:  # every parent is listed (in some medium) before its child
        assert event.parent_block_hash is None or event.parent_block_hash in listed
        listed.add(event.block_hashes[0])
    assert {(e.medium, e.block_hashes[0]) for e in dump} == {("GPU", H0), ("CPU", H1), ("Disk", H2)}

    live, rebuilt = _node_index(), _node_index()
    rebuilt.apply("b", stored([H0], T0, medium="CPU"))  # a neighbour's block in the node tier
    live.apply("b", stored([H0], T0, medium="CPU"))
    live.apply_batch("a", events)
    rebuilt.apply("a", stored([99], list(range(900, 900 + BS)), medium="DISK"))  # stale: the dump's clear drops it
    rebuilt.apply_batch("a", [AllBlocksCleared(), *dump])  # what the follower does with a dump
    assert rebuilt.stats.unknown_parents == 0
    for worker in ("a", "b"):
        for tier in Tier:
            assert rebuilt.blocks_of(worker, tier) == live.blocks_of(worker, tier)
    assert rebuilt.find_tiered_matches(QUERY) == live.find_tiered_matches(QUERY) == {"a": m(1, 1, 1), "b": m(0, 2)}
    table.apply(make_batch([AllBlocksCleared()]))
    assert table.as_events() == []


def _card(worker_id: str, node_tier: str | None) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id,
        model="m",
        tokenizer="m",
        chat_template="m",
        context_length=8192,
        block_size=BS,
        total_kv_blocks=1024,
        request_plane_address="127.0.0.1:1000",
        kv_node_tier=node_tier,
    )


# ---- property: agreement with a brute-force model -------------------------------------------------


class _Model:
    """What each worker holds per tier, and each node tier's blocks, as plain sets (engine hashes
    are the router's hashes here, so a set per holder and tier is the whole truth)."""

    def __init__(self) -> None:
        self.tiers: dict[str, list[set[int]]] = {}
        self.node_of: dict[str, str] = {}
        self.nodes: dict[str, set[int]] = {}

    def target(self, worker: str, tier: Tier) -> set[int]:
        if tier == Tier.HOST and worker in self.node_of:
            return self.nodes[self.node_of[worker]]
        return self.tiers.setdefault(worker, [set(), set(), set()])[tier]

    def held(self, worker: str, tier: Tier) -> set[int]:
        own = self.tiers.get(worker, [set(), set(), set()])[tier]
        node = self.node_of.get(worker)
        return own | self.nodes[node] if tier == Tier.HOST and node is not None else own

    def set_node(self, worker: str, node: str | None) -> None:
        if self.node_of.get(worker) == node:
            return
        old = self.node_of.pop(worker, None)
        if old is not None and old not in self.node_of.values():
            del self.nodes[old]
        if node is not None:
            self.tiers.setdefault(worker, [set(), set(), set()])
            self.node_of[worker] = node
            self.nodes.setdefault(node, set())

    def expected(self, query: list[int]) -> dict[str, TieredMatch]:
        out = {}
        for worker in set(self.tiers) | set(self.node_of):
            counts = [0, 0, 0]
            for seq_hash in query:
                best = next((t for t in Tier if seq_hash in self.held(worker, t)), None)
                if best is None:
                    break
                counts[best] += 1
            if sum(counts):
                out[worker] = TieredMatch(*counts)
        return out


_blocks = [list(range(s, s + BS)) for s in (0, 10, 20, 30)]
_prompt_st = st.lists(st.sampled_from(_blocks), min_size=1, max_size=4).map(lambda bs: [t for b in bs for t in b])
_worker_st = st.sampled_from(["w0", "w1", "w2"])
_tier_st = st.sampled_from(list(Tier))
_node_st = st.sampled_from([None, "n1", "n1", "n2"])
_op_st = st.one_of(
    st.tuples(st.just("store"), _worker_st, _tier_st, _prompt_st, st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("store"), _worker_st, st.just(Tier.HOST), _prompt_st, st.just(0)),
    st.tuples(st.just("remove"), _worker_st, _tier_st, _prompt_st, st.integers(0, 3)),
    st.tuples(st.just("clear"), _worker_st, _tier_st, st.none(), st.none()),
    st.tuples(st.just("node"), _worker_st, _node_st, st.none(), st.none()),
    st.tuples(st.just("leave"), _worker_st, st.none(), st.none(), st.none()),
)
_MEDIUMS = {Tier.DEVICE: "GPU", Tier.HOST: "CPU", Tier.DISK: "DISK"}


def _apply_op(idx: KvIndexer, model: _Model, op: tuple) -> None:
    kind, worker, arg, prompt, start = op
    if kind in ("store", "remove"):
        hashes = block_hashes(prompt, BS)
        start = min(start, len(hashes) - 1)
        target = model.target(worker, arg)
        if kind == "remove":
            idx.apply(worker, removed(hashes[start:], _MEDIUMS[arg]))
            target.difference_update(hashes[start:])
            return
        parent = hashes[start - 1] if start else None
        idx.apply(worker, stored(hashes[start:], prompt[start * BS :], parent, _MEDIUMS[arg]))
        if parent is None or any(parent in model.held(worker, t) for t in Tier):
            target.update(hashes[start:])
    elif kind == "clear":
        idx.apply(worker, AllBlocksCleared())
        model.tiers[worker] = [set(), set(), set()]
    elif kind == "node":
        idx.set_node_tier(worker, arg)
        if arg is not None or worker in model.tiers:
            model.set_node(worker, arg)
    else:
        idx.remove_worker(worker)
        model.set_node(worker, None)
        model.tiers.pop(worker, None)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.tuples(_node_st, _node_st, _node_st),
    ops=st.lists(_op_st, max_size=30),
    queries=st.lists(_prompt_st, min_size=1, max_size=4),
)
def test_tiered_matches_agree_with_a_brute_force_model(nodes, ops, queries):
    idx, model = KvIndexer(BS), _Model()
    for worker, node in enumerate(nodes):
        _apply_op(idx, model, ("node", f"w{worker}", node, None, None))
    for op in ops:
        _apply_op(idx, model, op)
    for query in queries:
        seqs = block_hashes(query, BS)
        expected = model.expected(seqs)
        assert idx.find_tiered_matches(seqs) == expected
        assert idx.find_matches(seqs) == {w: match.depth for w, match in expected.items()}
    held = set().union(*model.nodes.values(), *(s for tiers in model.tiers.values() for s in tiers))
    assert idx.num_blocks() == len(held)

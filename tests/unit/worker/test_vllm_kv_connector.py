"""`TandemKvConnector`, vLLM's KV connector for disaggregation, without a vLLM engine.

Scheduler side, on fake requests and scheduler outputs shaped like vLLM's: a pull reports the full
blocks beyond the local hit (one prompt token always left to compute) and becomes a load of the
right blocks; an export becomes a save of the prompt's full blocks in the step that completes the
prompt (one step, or a chunked prefill over two), once; a finished export answers where its blocks
are held. Worker side, two real connectors on small random CPU caches: a save held by one is
pulled into the other's blocks; a pull whose tokens differ (or that fails) leaves the blocks alone
and reports them as load errors."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from tandem.worker.vllm_disagg import export_params, kv_transfer_config
from tandem.worker.vllm_kv_connector import (
    TandemConnectorMetadata,
    TandemConnectorStats,
    TandemKvConnector,
    _Load,
    _Save,
)

BLOCK = 4
PORT = 7100


def vllm_config(kv_role: str = "kv_both", port: int = PORT, block_size: int = BLOCK) -> SimpleNamespace:
    """What the connector reads of vLLM's ``VllmConfig``: the block size and a real KVTransferConfig."""
    transfer = KVTransferConfig(
        kv_connector="TandemKvConnector",
        kv_connector_module_path="tandem.worker.vllm_kv_connector",
        kv_role=kv_role,  # type: ignore[arg-type]
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"transfer_host": "127.0.0.1", "transfer_port": port, "hold_s": 30.0},
    )
    return SimpleNamespace(cache_config=SimpleNamespace(block_size=block_size), kv_transfer_config=transfer)


def scheduler_connector(**config: Any) -> TandemKvConnector:
    return TandemKvConnector(vllm_config(**config), KVConnectorRole.SCHEDULER)


def request(req_id: str, prompt: list[int], params: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=req_id, kv_transfer_params=params, prompt_token_ids=prompt, num_prompt_tokens=len(prompt)
    )


def pull(num_blocks: int, transfer_id: str = "t-1", address: str = "10.0.0.1:7100") -> dict[str, Any]:
    return {"tandem_pull": {"address": address, "transfer_id": transfer_id, "num_blocks": num_blocks}}


def allocated(block_ids: list[int]) -> SimpleNamespace:
    """vLLM's ``KVCacheBlocks`` of a request: one KV cache group."""
    return SimpleNamespace(get_block_ids=lambda: (list(block_ids),))


def new_req(req_id: str, block_ids: list[int], num_computed_tokens: int = 0) -> SimpleNamespace:
    """A ``NewRequestData`` (a request scheduled for the first time)."""
    return SimpleNamespace(req_id=req_id, block_ids=(list(block_ids),), num_computed_tokens=num_computed_tokens)


def step(
    scheduled: dict[str, int],
    new: list[SimpleNamespace] | None = None,
    cached: list[tuple[str, list[int] | None, int]] | None = None,
    resumed: set[str] | None = None,
) -> SimpleNamespace:
    """A ``SchedulerOutput``: ``scheduled`` tokens per request, the new requests, and the running
    ones as (req_id, new block ids or None, num_computed_tokens); ``resumed``: those resumed after a
    preemption, whose new block ids replace their old ones."""
    cached = cached or []
    return SimpleNamespace(
        num_scheduled_tokens=scheduled,
        scheduled_new_reqs=new or [],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[req_id for req_id, _, _ in cached],
            resumed_req_ids=resumed or set(),
            new_block_ids=[None if ids is None else (list(ids),) for _, ids, _ in cached],
            num_computed_tokens=[computed for _, _, computed in cached],
        ),
    )


def meta_of(connector: TandemKvConnector, scheduler_output: SimpleNamespace) -> TandemConnectorMetadata:
    meta = connector.build_connector_meta(scheduler_output)
    assert isinstance(meta, TandemConnectorMetadata)
    return meta


PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks of 4 and one token


def test_it_is_a_vllm_kv_connector_and_reads_its_config() -> None:
    connector = scheduler_connector(port=7123, block_size=16)
    assert isinstance(connector, KVConnectorBase_V1) and connector.role == KVConnectorRole.SCHEDULER
    assert (connector.block_size, connector.transfer_host, connector.transfer_port, connector.hold_s) == (
        16,
        "127.0.0.1",
        7123,
        30.0,
    )
    assert connector._loop is None and connector._server is None  # no IO thread on the scheduler side
    defaults = TandemKvConnector(
        SimpleNamespace(
            cache_config=SimpleNamespace(block_size=32),
            kv_transfer_config=KVTransferConfig(**kv_transfer_config("decode", "0.0.0.0", 1, 5.0)),
        ),
        KVConnectorRole.SCHEDULER,
    )
    assert (defaults.transfer_host, defaults.transfer_port, defaults.hold_s) == ("0.0.0.0", 1, 5.0)


# --- scheduler side: pulls ---


@pytest.mark.parametrize("params", [None, {}, {"other": 1}, {"tandem_pull": None}, export_params("t-9")])
def test_requests_without_a_pull_match_nothing(params: dict[str, Any] | None) -> None:
    connector = scheduler_connector()
    assert connector.get_num_new_matched_tokens(request("r", PROMPT, params), 0) == (0, False)
    connector.update_state_after_alloc(request("r", PROMPT, params), allocated([1, 2, 3, 4]), 0)
    assert meta_of(connector, step({"r": 13})).loads == []


@pytest.mark.parametrize(
    "prompt_len, num_blocks, local, expected",
    [
        (13, 3, 0, 12),  # all three held blocks
        (13, 5, 0, 12),  # more held than the prompt has full blocks
        (13, 2, 0, 8),  # fewer held
        (12, 3, 0, 8),  # the last full block is left to compute: vLLM needs one prompt token
        (13, 3, 4, 8),  # the local prefix cache has block 0
        (13, 3, 12, 0),  # ... or all of them
        (13, 2, 12, 0),  # the local hit goes beyond the held blocks
        (4, 1, 0, 0),  # a one-block prompt: its token must be computed
        (3, 1, 0, 0),  # shorter than a block
        (13, 0, 0, 0),
    ],
)
def test_a_pull_matches_full_blocks_beyond_the_local_hit(
    prompt_len: int, num_blocks: int, local: int, expected: int
) -> None:
    connector = scheduler_connector()
    req = request("r", list(range(prompt_len)), pull(num_blocks))
    assert connector.get_num_new_matched_tokens(req, local) == (expected, False)


def test_an_allocation_with_external_tokens_becomes_a_load_of_those_blocks() -> None:
    connector = scheduler_connector()
    req = request("r", PROMPT, pull(3, "t-7", "10.0.0.2:7200"))
    assert connector.get_num_new_matched_tokens(req, 4) == (8, False)
    connector.update_state_after_alloc(req, allocated([40, 41, 42, 43]), 8)
    meta = meta_of(connector, step({"r": 1}, new=[new_req("r", [40, 41, 42, 43], 12)]))
    assert meta.loads == [
        _Load(
            address="10.0.0.2:7200",
            transfer_id="t-7",
            block_indices=[1, 2],
            block_ids=[41, 42],
            token_ids=PROMPT[4:12],
        )
    ]
    assert meta.saves == []
    assert meta_of(connector, step({"r": 1}, cached=[("r", None, 13)])).loads == []  # loaded once


def test_loads_of_several_requests_go_in_one_step() -> None:
    connector = scheduler_connector()
    other = list(range(200, 209))  # 2 full blocks + 1
    for req, blocks in (
        (request("a", PROMPT, pull(3, "ta")), [1, 2, 3, 4]),
        (request("b", other, pull(2, "tb")), [7, 8, 9]),
    ):
        matched, _ = connector.get_num_new_matched_tokens(req, 0)
        connector.update_state_after_alloc(req, allocated(blocks), matched)
    loads = meta_of(connector, step({"a": 1, "b": 1})).loads
    assert [(load.transfer_id, load.block_indices, load.block_ids) for load in loads] == [
        ("ta", [0, 1, 2], [1, 2, 3]),
        ("tb", [0, 1], [7, 8]),
    ]
    assert loads[1].token_ids == other[:8]


def test_an_allocation_without_external_tokens_loads_nothing() -> None:
    connector = scheduler_connector()
    req = request("r", PROMPT, pull(3))
    assert connector.get_num_new_matched_tokens(req, 12) == (0, False)
    connector.update_state_after_alloc(req, allocated([1, 2, 3, 4]), 0)
    assert meta_of(connector, step({"r": 1})).loads == []


# --- scheduler side: exports ---


def test_an_export_saves_its_full_blocks_in_the_step_that_completes_the_prompt() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-1"))
    assert connector.get_num_new_matched_tokens(req, 0) == (0, False)  # an export loads nothing
    connector.update_state_after_alloc(req, allocated([5, 6, 7, 8]), 0)
    meta = meta_of(connector, step({"p": 13}, new=[new_req("p", [5, 6, 7, 8])]))
    assert meta.saves == [_Save("t-1", [5, 6, 7], PROMPT[:12])] and meta.loads == []
    # The next (decode) step saves nothing again.
    assert meta_of(connector, step({"p": 1}, cached=[("p", None, 13)])).saves == []
    assert connector.request_finished(req, [5, 6, 7, 8]) == (
        False,
        {"tandem_transfer": {"address": f"127.0.0.1:{PORT}", "transfer_id": "t-1", "num_blocks": 3}},
    )


def test_an_export_after_a_local_prefix_hit_saves_from_block_zero() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-1"))
    connector.get_num_new_matched_tokens(req, 8)
    meta = meta_of(connector, step({"p": 5}, new=[new_req("p", [30, 31, 5, 6], num_computed_tokens=8)]))
    assert meta.saves == [_Save("t-1", [30, 31, 5], PROMPT[:12])]


def test_a_chunked_prefill_saves_in_its_last_chunk_with_the_blocks_added_since() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-2"))
    connector.get_num_new_matched_tokens(req, 0)
    # Step 1: 6 of 13 prompt tokens, in blocks 5 and 6.
    assert meta_of(connector, step({"p": 6}, new=[new_req("p", [5, 6])])).saves == []
    # Step 2: the other 7 tokens, with blocks 9 and 4 added.
    meta = meta_of(connector, step({"p": 7}, cached=[("p", [9, 4], 6)]))
    assert meta.saves == [_Save("t-2", [5, 6, 9], PROMPT[:12])]
    assert meta_of(connector, step({"p": 1}, cached=[("p", None, 13)])).saves == []
    answer = connector.request_finished(req, [5, 6, 9, 4])
    assert answer == (
        False,
        {"tandem_transfer": {"address": f"127.0.0.1:{PORT}", "transfer_id": "t-2", "num_blocks": 3}},
    )


def test_a_chunked_prefill_over_three_steps_saves_only_at_the_end() -> None:
    connector = scheduler_connector()
    prompt = list(range(20))  # 5 full blocks
    req = request("p", prompt, export_params("t-3"))
    connector.get_num_new_matched_tokens(req, 0)
    assert meta_of(connector, step({"p": 8}, new=[new_req("p", [1, 2])])).saves == []
    assert meta_of(connector, step({"p": 8}, cached=[("p", [3, 4], 8)])).saves == []
    assert meta_of(connector, step({"p": 4}, cached=[("p", [5], 16)])).saves == [_Save("t-3", [1, 2, 3, 4, 5], prompt)]


def test_an_export_preempted_mid_prefill_saves_the_blocks_it_resumed_with() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-4"))
    connector.get_num_new_matched_tokens(req, 0)
    assert meta_of(connector, step({"p": 8}, new=[new_req("p", [5, 6])])).saves == []
    # Preempted (blocks 5 and 6 freed), then resumed from scratch in other blocks.
    meta = meta_of(connector, step({"p": 13}, cached=[("p", [20, 21, 22, 23], 0)], resumed={"p"}))
    assert meta.saves == [_Save("t-4", [20, 21, 22], PROMPT[:12])]


def test_an_export_not_scheduled_in_a_step_is_not_saved_by_it() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-1"))
    connector.get_num_new_matched_tokens(req, 0)
    connector.get_num_new_matched_tokens(req, 0)  # asked again (not scheduled the first time): one export
    other = request("x", PROMPT)
    connector.get_num_new_matched_tokens(other, 0)
    assert meta_of(connector, step({"x": 13}, new=[new_req("x", [1, 2, 3, 4])])).saves == []
    assert meta_of(connector, step({"p": 13}, new=[new_req("p", [5, 6, 7, 8])])).saves == [
        _Save("t-1", [5, 6, 7], PROMPT[:12])
    ]


def test_exports_and_loads_share_a_step() -> None:
    connector = scheduler_connector()
    exporter, puller = request("p", PROMPT, export_params("t-1")), request("d", PROMPT, pull(3, "t-0"))
    connector.get_num_new_matched_tokens(exporter, 0)
    matched, _ = connector.get_num_new_matched_tokens(puller, 0)
    connector.update_state_after_alloc(puller, allocated([10, 11, 12, 13]), matched)
    meta = meta_of(
        connector, step({"p": 13, "d": 1}, new=[new_req("p", [5, 6, 7, 8]), new_req("d", [10, 11, 12, 13], 12)])
    )
    assert [save.transfer_id for save in meta.saves] == ["t-1"] and [load.transfer_id for load in meta.loads] == ["t-0"]


def test_a_prompt_shorter_than_a_block_holds_nothing() -> None:
    connector = scheduler_connector()
    req = request("p", [1, 2, 3], export_params("t-1"))
    connector.get_num_new_matched_tokens(req, 0)
    assert meta_of(connector, step({"p": 3}, new=[new_req("p", [5])])).saves == []
    assert connector.request_finished(req, [5]) == (False, None)


def test_an_export_finished_before_its_prompt_was_computed_answers_nothing() -> None:
    connector = scheduler_connector()
    req = request("p", PROMPT, export_params("t-1"))
    connector.get_num_new_matched_tokens(req, 0)
    assert meta_of(connector, step({"p": 8}, new=[new_req("p", [5, 6])])).saves == []
    assert connector.request_finished(req, [5, 6]) == (False, None)  # aborted mid-prefill
    assert connector._exports == {} and connector._local_computed == {}


@pytest.mark.parametrize("params", [None, pull(3)])
def test_other_finished_requests_answer_nothing(params: dict[str, Any] | None) -> None:
    connector = scheduler_connector()
    req = request("r", PROMPT, params)
    connector.get_num_new_matched_tokens(req, 0)
    assert connector.request_finished(req, [1, 2, 3, 4]) == (False, None)
    assert connector._local_computed == {}
    assert connector.request_finished(request("never-seen", PROMPT), []) == (False, None)


# --- worker side: hold on one connector, pull into another ---

LAYERS, NUM_BLOCKS, HEADS, HEAD_DIM = 2, 8, 2, 3


def worker_connector(kv_role: str) -> TandemKvConnector:
    return TandemKvConnector(vllm_config(kv_role=kv_role, port=0), KVConnectorRole.WORKER)


def caches(fill: str) -> dict[str, torch.Tensor]:
    """vLLM's CPU KV caches: one [num_blocks, kv_heads, block_size, 2 * head_dim] tensor per layer."""
    shape = (NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM)
    make = torch.randn if fill == "random" else torch.zeros
    return {f"model.layers.{i}.self_attn.attn": make(*shape, dtype=torch.float32) for i in range(LAYERS)}


@pytest.fixture
def producer() -> Iterator[TandemKvConnector]:
    connector = worker_connector("kv_both")
    try:
        connector.register_kv_caches(caches("random"))
        yield connector
    finally:
        connector.shutdown()


@pytest.fixture
def consumer() -> Iterator[TandemKvConnector]:
    connector = worker_connector("kv_consumer")
    try:
        connector.register_kv_caches(caches("zeros"))
        yield connector
    finally:
        connector.shutdown()


def hold(producer: TandemKvConnector, save: _Save) -> None:
    producer.bind_connector_metadata(TandemConnectorMetadata(saves=[save]))
    producer.wait_for_save()
    producer.clear_connector_metadata()


def load(consumer: TandemKvConnector, *loads: _Load) -> None:
    consumer.bind_connector_metadata(TandemConnectorMetadata(loads=list(loads)))
    consumer.start_load_kv(None)
    consumer.clear_connector_metadata()


def counts(connector: TandemKvConnector) -> dict[str, int | float] | None:
    """This step's connector stats, as vLLM's stat loggers get them (None: nothing to report)."""
    stats = connector.get_kv_connector_stats()
    return None if stats is None else stats.reduce()


def address(producer: TandemKvConnector) -> str:
    assert producer._server is not None
    return producer._server.address


def test_held_blocks_are_pulled_into_the_allocated_blocks(
    producer: TandemKvConnector, consumer: TandemKvConnector
) -> None:
    assert consumer._server is None  # a kv_consumer serves nothing
    hold(producer, _Save("t-1", [3, 5, 1], PROMPT[:12]))
    assert producer._server is not None and "t-1" in producer._server.store
    assert counts(producer) == {"blocks_loaded": 0, "load_failures": 0, "blocks_held": 3}
    assert counts(producer) is None  # reported once
    load(consumer, _Load(address(producer), "t-1", [0, 1, 2], [6, 2, 7], PROMPT[:12]))
    assert consumer.get_block_ids_with_load_errors() == set()
    assert counts(consumer) == {"blocks_loaded": 3, "load_failures": 0, "blocks_held": 0}
    for source, target in zip(producer._layers, consumer._layers, strict=True):
        for src, dst in ((3, 6), (5, 2), (1, 7)):
            assert torch.equal(target[dst], source[src])
        for untouched in (0, 1, 3, 4, 5):
            assert not target[untouched].any()


def test_a_pull_of_the_blocks_beyond_a_local_hit_takes_only_those(
    producer: TandemKvConnector, consumer: TandemKvConnector
) -> None:
    hold(producer, _Save("t-1", [3, 5, 1], PROMPT[:12]))
    load(consumer, _Load(address(producer), "t-1", [1, 2], [4, 0], PROMPT[4:12]))
    assert consumer.get_block_ids_with_load_errors() == set()
    for source, target in zip(producer._layers, consumer._layers, strict=True):
        assert torch.equal(target[4], source[5]) and torch.equal(target[0], source[1])
        assert not target[[1, 2, 3, 5, 6, 7]].any()


def test_blocks_of_other_tokens_are_not_written_and_are_load_errors(
    producer: TandemKvConnector, consumer: TandemKvConnector
) -> None:
    hold(producer, _Save("t-1", [3, 5], PROMPT[:8]))
    wrong = [*PROMPT[:7], 999]
    load(consumer, _Load(address(producer), "t-1", [0, 1], [6, 2], wrong))
    assert consumer.get_block_ids_with_load_errors() == {6, 2}
    assert consumer.get_block_ids_with_load_errors() == set()  # reported once
    assert counts(consumer) == {"blocks_loaded": 0, "load_failures": 1, "blocks_held": 0}
    assert not any(layer.any() for layer in consumer._layers)


def test_a_failed_pull_is_a_load_error_and_other_loads_still_run(
    producer: TandemKvConnector, consumer: TandemKvConnector
) -> None:
    hold(producer, _Save("t-1", [3], PROMPT[:4]))
    load(
        consumer,
        _Load(address(producer), "no-such-transfer", [0], [1], PROMPT[:4]),
        _Load(address(producer), "t-1", [0], [2], PROMPT[:4]),
    )
    assert consumer.get_block_ids_with_load_errors() == {1}
    assert counts(consumer) == {"blocks_loaded": 1, "load_failures": 1, "blocks_held": 0}
    for source, target in zip(producer._layers, consumer._layers, strict=True):
        assert torch.equal(target[2], source[3]) and not target[1].any()


def test_blocks_of_another_layout_are_refused(producer: TandemKvConnector) -> None:
    other = worker_connector("kv_consumer")
    try:
        other.register_kv_caches({name: torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 4 * HEAD_DIM) for name in ("a", "b")})
        hold(producer, _Save("t-1", [3], PROMPT[:4]))
        load(other, _Load(address(producer), "t-1", [0], [1], PROMPT[:4]))
        assert other.get_block_ids_with_load_errors() == {1}
        assert not any(layer.any() for layer in other._layers)
    finally:
        other.shutdown()


def test_a_duplicate_transfer_id_is_not_held_twice(producer: TandemKvConnector) -> None:
    hold(producer, _Save("t-1", [3], PROMPT[:4]))
    hold(producer, _Save("t-1", [5], PROMPT[4:8]))  # logged, not raised: the decode side prefills
    assert producer._server is not None and len(producer._server.store) == 1


def test_a_pull_touches_the_io_loop_only_from_its_own_thread(
    producer: TandemKvConnector, consumer: TandemKvConnector
) -> None:
    assert consumer._loop is not None
    consumer._loop.set_debug(True)  # asyncio then refuses calls from other threads
    hold(producer, _Save("t-1", [3], PROMPT[:4]))
    load(consumer, _Load(address(producer), "t-1", [0], [2], PROMPT[:4]))
    assert consumer.get_block_ids_with_load_errors() == set()


def test_connector_stats_aggregate_and_rebuild_from_vllms_payload() -> None:
    worker = TandemConnectorStats(data={"blocks_loaded": 3, "load_failures": 1})
    assert worker.data == {"blocks_loaded": 3, "load_failures": 1, "blocks_held": 0} and not worker.is_empty()
    rebuilt = TandemKvConnector.build_kv_connector_stats(worker.to_dict())  # the scheduler's copy
    assert isinstance(rebuilt, TandemConnectorStats) and rebuilt.reduce() == worker.reduce()
    total = rebuilt.aggregate(TandemConnectorStats(data={"blocks_loaded": 2, "blocks_held": 4}))
    assert total.reduce() == {"blocks_loaded": 5, "load_failures": 1, "blocks_held": 4}
    assert total is rebuilt  # aggregated in place, as vLLM expects
    rebuilt.reset()
    assert rebuilt.is_empty() and TandemKvConnector.build_kv_connector_stats(None) is not None
    assert scheduler_connector().get_kv_connector_stats() is None  # the scheduler side counts nothing

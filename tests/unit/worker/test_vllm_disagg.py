"""What a vLLM worker tells vLLM's KV connector and reads back: the ``kv_transfer_config`` per role,
the export and pull ``kv_transfer_params`` of a request, and where a finished prefill holds its
blocks (None when it held none)."""

from __future__ import annotations

from typing import Any

import pytest

from tandem.protocols.endpoints import KvTransferParams
from tandem.worker.vllm_disagg import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    EXPORT_KEY,
    PULL_KEY,
    TRANSFER_KEY,
    export_params,
    held_transfer,
    kv_transfer_config,
    pull_params,
)


@pytest.mark.parametrize("role, kv_role", [("prefill", "kv_producer"), ("decode", "kv_consumer")])
def test_kv_transfer_config_per_role(role: str, kv_role: str) -> None:
    assert kv_transfer_config(role, "10.0.0.5", 7100, 30.0) == {
        "kv_connector": "TandemKvConnector",
        "kv_connector_module_path": "tandem.worker.vllm_kv_connector",
        "kv_role": kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"transfer_host": "10.0.0.5", "transfer_port": 7100, "hold_s": 30.0},
    }


@pytest.mark.parametrize("role", ["agg", "both", ""])
def test_kv_transfer_config_refuses_other_roles(role: str) -> None:
    with pytest.raises(ValueError, match=repr(role)):
        kv_transfer_config(role, "127.0.0.1", 1, 1.0)


def test_the_connector_named_is_the_real_one() -> None:
    pytest.importorskip("vllm")
    import importlib

    from vllm.config import KVTransferConfig

    module = importlib.import_module(CONNECTOR_MODULE)
    assert hasattr(module, CONNECTOR_NAME)
    # vLLM accepts the config as the worker passes it (--vllm-arg kv_transfer_config=...).
    for role in ("prefill", "decode"):
        config = KVTransferConfig(**kv_transfer_config(role, "127.0.0.1", 7100, 60.0))
        assert config.get_from_extra_config("transfer_port", 0) == 7100
        assert config.is_kv_producer == (role == "prefill") and config.is_kv_consumer == (role == "decode")


def test_export_params() -> None:
    assert export_params("t-1") == {"tandem_export": {"transfer_id": "t-1"}} == {EXPORT_KEY: {"transfer_id": "t-1"}}


def test_pull_params_carry_the_transfer_but_not_the_prefill_workers_address() -> None:
    transfer = KvTransferParams("127.0.0.1:7100", "t-1", 3, "127.0.0.1:9000")
    assert pull_params(transfer) == {PULL_KEY: {"address": "127.0.0.1:7100", "transfer_id": "t-1", "num_blocks": 3}}


def test_held_transfer_reads_the_connectors_answer() -> None:
    answer = {TRANSFER_KEY: {"address": "127.0.0.1:7100", "transfer_id": "t-1", "num_blocks": 3}}
    assert held_transfer(answer, "127.0.0.1:9000") == KvTransferParams(
        address="127.0.0.1:7100", transfer_id="t-1", num_blocks=3, worker_address="127.0.0.1:9000"
    )
    # Values that crossed a JSON / msgpack boundary are normalized.
    loose = {TRANSFER_KEY: {"address": "h:1", "transfer_id": 42, "num_blocks": "2"}}
    assert held_transfer(loose, "w:2") == KvTransferParams("h:1", "42", 2, "w:2")


@pytest.mark.parametrize("answer", [None, {}, {TRANSFER_KEY: None}, {TRANSFER_KEY: {}}, {"other": {"x": 1}}])
def test_held_transfer_is_none_when_nothing_was_held(answer: dict[str, Any] | None) -> None:
    assert held_transfer(answer, "127.0.0.1:9000") is None


def test_pull_params_round_trip_through_held_transfer() -> None:
    transfer = KvTransferParams("127.0.0.1:7100", "t-9", 5, "127.0.0.1:9000")
    answer = {TRANSFER_KEY: pull_params(transfer)[PULL_KEY]}
    assert held_transfer(answer, transfer.worker_address) == transfer

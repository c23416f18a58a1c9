"""Disaggregated serving on vLLM workers: what the worker tells vLLM's KV connector, and back.

The KV itself moves inside vLLM, through `tandem.worker.vllm_kv_connector.TandemKvConnector`
(loaded by module path); this module holds the few things the worker process needs without
importing vLLM: the connector's config and the ``kv_transfer_params`` each request carries.
"""

from __future__ import annotations

from typing import Any

from tandem.protocols.endpoints import KvTransferParams

CONNECTOR_NAME = "TandemKvConnector"
CONNECTOR_MODULE = "tandem.worker.vllm_kv_connector"
EXPORT_KEY, PULL_KEY, TRANSFER_KEY = "tandem_export", "tandem_pull", "tandem_transfer"
"""``kv_transfer_params`` keys: export this prompt (prefill), pull these blocks (decode), and the
prefill connector's answer (where the held blocks are)."""


KV_HOLD_S = 60.0
"""How long a prefill worker's connector holds blocks nobody pulled (the builtin worker's default too)."""


def kv_transfer_config(role: str, host: str, transfer_port: int, hold_s: float = KV_HOLD_S) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for a ``prefill`` or ``decode`` worker. A prefill worker's
    connector serves held blocks on ``host:transfer_port`` for ``hold_s`` seconds; a decode
    worker recomputes any block it fails to load."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"no KV connector for role {role!r}")
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"transfer_host": host, "transfer_port": transfer_port, "hold_s": hold_s},
    }


def export_params(transfer_id: str) -> dict[str, Any]:
    """A prefill request's ``kv_transfer_params``: hold its prompt's blocks under ``transfer_id``."""
    return {EXPORT_KEY: {"transfer_id": transfer_id}}


def pull_params(transfer: KvTransferParams) -> dict[str, Any]:
    """A decode request's ``kv_transfer_params``: pull the prompt's blocks from the prefill worker."""
    return {
        PULL_KEY: {"address": transfer.address, "transfer_id": transfer.transfer_id, "num_blocks": transfer.num_blocks}
    }


def held_transfer(answer: dict[str, Any] | None, worker_address: str) -> KvTransferParams | None:
    """Where a finished prefill's blocks are held, from the connector's answer; None when nothing
    was held (prompt shorter than a block): the decode side then prefills."""
    held = (answer or {}).get(TRANSFER_KEY)
    if not held:
        return None
    return KvTransferParams(str(held["address"]), str(held["transfer_id"]), int(held["num_blocks"]), worker_address)

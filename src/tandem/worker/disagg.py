"""The worker's two halves of disaggregated serving.

**Prefill side** (``PrefillExporter``, on ``--role prefill`` workers): a request sent with
``export_kv`` runs as usual (the frontend asks for one token); when it finishes, the prompt's
cached full blocks are exported from the engine and held in a `TransferStore`, served by this
worker's `KvTransferServer`, and the final delta carries `KvTransferParams` saying where to pull
them. The held copy lives in host memory, not in the engine's pool, so the pool is never pinned;
it is freed when a decode worker pulls it, when the frontend cancels it (``kv_release``), or
after ``ttl_s``.

**Decode side** (:func:`import_missing_blocks`): a request that carries `KvTransferParams` first
pulls the blocks of the prompt this worker does not hold yet (only those: a cached prefix stays),
imports them into its prefix cache, then runs; the engine then hits them like any cached prefix.
Any failure (prefill worker gone, corrupted or truncated transfer, no room in the pool) is logged
and counted, and the request simply prefills locally: disaggregation never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from tandem.protocols.endpoints import KvTransferParams
from tandem.transfer import (
    KvTransferServer,
    TransferError,
    TransferStore,
    TransferStoreConfig,
    default_metrics,
    pull_blocks,
)

if TYPE_CHECKING:
    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.engine_core import EngineCore
    from tandem.protocols.kv_export import KVBlockExport

logger = logging.getLogger(__name__)


class PrefillExporter:
    """Exports finished prefills and serves them to decode workers until pulled or expired."""

    def __init__(self, engine: AsyncEngine, host: str = "127.0.0.1", ttl_s: float = 60.0) -> None:
        self.engine = engine
        self.store = TransferStore(TransferStoreConfig(ttl_s=ttl_s), metrics=default_metrics())
        self.server = KvTransferServer(self.store, host=host)

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()  # cancels whatever is still held

    def hold(self, transfer_id: str, export: KVBlockExport | None, worker_address: str) -> KvTransferParams | None:
        """Hold a finished prompt's export (made on the engine thread when the request finished:
        ``export_on_finish``) for a decode worker; None if there is nothing to hold."""
        if export is None or not export.block_hashes:
            return None  # prompt shorter than a block, export failed, or already evicted: the decode side prefills
        try:
            self.store.hold(transfer_id, export)
        except ValueError as exc:  # a duplicate id: the earlier hold stays, this one is not offered
            logger.warning("not holding KV for %s: %s", transfer_id, exc)
            return None
        return KvTransferParams(self.server.address, transfer_id, len(export.block_hashes), worker_address)

    def release(self, transfer_id: str) -> bool:
        """Free a held export nobody will pull (the client went away); False if not held."""
        return self.store.release(transfer_id, "cancelled")


def export_on_finish(token_ids: list[int], cache_salt: str | None) -> Callable[[EngineCore], KVBlockExport]:
    """The ``on_finish`` hook of a prefill request: export its prompt's cached blocks at once, on
    the engine thread, in the step that finished it (an ``engine.call`` would wait for the next
    step, delaying the first token by up to a step)."""
    return lambda core: core.export_kv(token_ids, cache_salt)


async def import_missing_blocks(
    engine: AsyncEngine, prompt: list[int], cache_salt: str | None, params: KvTransferParams, timeout_s: float = 30.0
) -> int:
    """Pull and import the prompt blocks this engine lacks; returns how many it imported (0 on
    any failure, after logging it: the request then prefills them itself)."""
    have = await engine.call(lambda core: core.num_cached_prompt_blocks(prompt, cache_salt))
    if have >= params.num_blocks:
        return 0
    try:
        pulled = await pull_blocks(
            params.address, params.transfer_id, list(range(have, params.num_blocks)), timeout_s=timeout_s
        )
        try:
            modeled_s = engine.core.modeled_transfer_s(params.num_blocks - have)  # the mocker's bandwidth model
            if modeled_s > 0:
                await asyncio.sleep(modeled_s)
            # Imported straight from the pulled payload (no copy).
            export = pulled.to_export(copy=False)
            importing = asyncio.ensure_future(engine.call(lambda core: core.import_kv(export)))
        except BaseException:
            pulled.close()
            raise
        # The payload is released when the engine thread is done reading it, however often this
        # task is cancelled meanwhile.
        importing.add_done_callback(lambda _: pulled.close())
        return await asyncio.shield(importing)
    except (TransferError, ValueError, OSError) as exc:
        logger.warning(
            "KV transfer %s from %s failed (%s); prefilling locally", params.transfer_id, params.address, exc
        )
        return 0

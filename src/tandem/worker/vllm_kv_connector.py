"""`TandemKvConnector`: a vLLM KV connector (``KVConnectorBase_V1``) that moves a prompt's KV
blocks from a prefill vLLM worker to a decode vLLM worker through Tandem's transfer service.

vLLM loads it by module path (``KVTransferConfig(kv_connector="TandemKvConnector",
kv_connector_module_path="tandem.worker.vllm_kv_connector")``); ``tandem worker --engine vllm
--role prefill|decode`` sets that up. vLLM makes two instances: the *scheduler* side (in vLLM's
engine-core process) decides what to save and load; the *worker* side (in the process that holds
the KV cache tensors) copies blocks. Requests say what they want in ``kv_transfer_params``:

* ``{"tandem_export": {"transfer_id": T}}`` (prefill): once the step that completes the prompt
  has run, the worker side copies the prompt's full blocks (all layers) into host memory and holds
  them in a `TransferStore` under ``T``, served by a `KvTransferServer` in that process. The
  finished request's ``kv_transfer_params`` then say where to pull them:
  ``{"tandem_transfer": {"address", "transfer_id", "num_blocks"}}``.
* ``{"tandem_pull": {"address", "transfer_id", "num_blocks"}}`` (decode): the scheduler side
  reports the blocks beyond the local prefix-cache hit as external tokens; before the forward
  pass the worker side pulls exactly those blocks, checks that their tokens are this prompt's,
  and writes them into the blocks vLLM allocated. A failed pull or a token mismatch reports the
  blocks as load errors, and vLLM recomputes them (``kv_load_failure_policy="recompute"``).

Blocks travel in vLLM's own per-block layout (on the CPU backend
``[layers, kv_heads, block_size, 2 × head_dim]``), so both workers must run the same model,
dtype, block size and attention backend; `KVBlockExport.block_shape` and ``dtype`` carry the
layout and a mismatch is refused. The transfer is synchronous within the decode step (the
builtin engine's import is too): the first decode step waits for the pull.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from tandem.protocols.block_hash import block_hashes, seed_for_salt
from tandem.protocols.kv_export import KVBlockExport
from tandem.transfer import KvTransferServer, TransferError, TransferStore, TransferStoreConfig, pull_blocks
from tandem.worker.vllm_disagg import EXPORT_KEY, PULL_KEY, TRANSFER_KEY

logger = logging.getLogger(__name__)

PULL_TIMEOUT_S = 30.0


@dataclass
class _Save:
    transfer_id: str
    block_ids: list[int]
    token_ids: list[int]
    """The tokens of the saved (full) blocks."""


@dataclass
class _Load:
    address: str
    transfer_id: str
    block_indices: list[int]
    """Positions of the blocks in the prompt (and in the transfer)."""
    block_ids: list[int]
    """The vLLM blocks to write them into."""
    token_ids: list[int]
    """What the pulled blocks' tokens must be (this prompt's)."""


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    saves: list[_Save] = field(default_factory=list)
    loads: list[_Load] = field(default_factory=list)


STAT_NAMES = ("blocks_loaded", "load_failures", "blocks_held")


@dataclass
class TandemConnectorStats(KVConnectorStats):
    """Counts since the previous report, sent by the worker side with each step's output; vLLM
    hands them to stat loggers as ``scheduler_stats.kv_connector_stats`` (this ``data`` dict):
    ``blocks_loaded`` (pulled and written into the KV cache), ``load_failures`` (pulls that
    failed: vLLM recomputed those blocks), ``blocks_held`` (prefill blocks put in the store)."""

    def __post_init__(self) -> None:
        for name in STAT_NAMES:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(STAT_NAMES, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in STAT_NAMES:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: self.data.get(name, 0) for name in STAT_NAMES}

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in STAT_NAMES)


@dataclass
class _Export:
    """A prefill request being tracked on the scheduler side until its prompt is computed."""

    transfer_id: str
    prompt: list[int]
    block_ids: list[int]
    saved_blocks: int = 0


class TandemKvConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size: int = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config
        self.transfer_host: str = extra.get_from_extra_config("transfer_host", "127.0.0.1")
        self.transfer_port: int = int(extra.get_from_extra_config("transfer_port", 0))
        self.hold_s: float = float(extra.get_from_extra_config("hold_s", 60.0))
        # scheduler side
        self._local_computed: dict[str, int] = {}
        self._pending_loads: list[_Load] = []
        self._exports: dict[str, _Export] = {}
        # worker side
        self._layers: list[torch.Tensor] = []
        self._load_errors: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: KvTransferServer | None = None
        self._stats = TandemConnectorStats()
        if role == KVConnectorRole.WORKER:
            self._start_io_thread()

    # --- scheduler side (vLLM's engine-core process) ---

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        self._local_computed[request.request_id] = num_computed_tokens
        if EXPORT_KEY in params and request.request_id not in self._exports:
            self._exports[request.request_id] = _Export(
                str(params[EXPORT_KEY]["transfer_id"]), list(request.prompt_token_ids), []
            )
        pull = params.get(PULL_KEY)
        if not pull:
            return 0, False
        # Full blocks only, and at least one prompt token left for vLLM to compute.
        usable = min(int(pull["num_blocks"]), (request.num_prompt_tokens - 1) // self.block_size) * self.block_size
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        pull = request.kv_transfer_params[PULL_KEY]
        first = self._local_computed.get(request.request_id, 0) // self.block_size
        count = num_external_tokens // self.block_size
        block_ids = list(blocks.get_block_ids()[0])
        size = self.block_size
        self._pending_loads.append(
            _Load(
                address=str(pull["address"]),
                transfer_id=str(pull["transfer_id"]),
                block_indices=list(range(first, first + count)),
                block_ids=block_ids[first : first + count],
                token_ids=list(request.prompt_token_ids[first * size : (first + count) * size]),
            )
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = TandemConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            export = self._exports.get(new.req_id)
            if export is not None:
                export.block_ids = list(new.block_ids[0])
                self._maybe_save(meta, export, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            export = self._exports.get(req_id)
            if export is None:
                continue
            new_block_ids = cached.new_block_ids[index]
            if new_block_ids:
                if req_id in cached.resumed_req_ids:  # resumed after preemption: its whole new list
                    export.block_ids = list(new_block_ids[0])
                else:
                    export.block_ids += list(new_block_ids[0])
            self._maybe_save(meta, export, cached.num_computed_tokens[index] + scheduled.get(req_id, 0))
        return meta

    def _maybe_save(self, meta: TandemConnectorMetadata, export: _Export, computed_after_step: int) -> None:
        """Save the prompt's full blocks in the step that computes the prompt's last token."""
        if export.saved_blocks or computed_after_step < len(export.prompt):
            return
        num_blocks = len(export.prompt) // self.block_size
        if num_blocks == 0:
            return
        export.saved_blocks = num_blocks
        tokens = export.prompt[: num_blocks * self.block_size]
        meta.saves.append(_Save(export.transfer_id, export.block_ids[:num_blocks], tokens))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._local_computed.pop(request.request_id, None)
        export = self._exports.pop(request.request_id, None)
        if export is None or not export.saved_blocks:
            return False, None
        address = f"{self.transfer_host}:{self.transfer_port}"
        transfer = {"address": address, "transfer_id": export.transfer_id, "num_blocks": export.saved_blocks}
        return False, {TRANSFER_KEY: transfer}  # the blocks were copied out: vLLM may free them now

    # --- worker side (the process holding the KV cache tensors) ---

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = list(kv_caches.values())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        for load in meta.loads:
            try:
                self._load(load)
            except (TransferError, ValueError, OSError, TimeoutError) as exc:
                logger.warning(
                    "KV pull %s from %s failed (%s); vLLM recomputes those blocks", load.transfer_id, load.address, exc
                )
                self._load_errors.update(load.block_ids)
                self._stats.data["load_failures"] += 1

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass  # blocks are written before the forward pass (start_load_kv is synchronous)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # saved whole, after the forward pass (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TandemConnectorMetadata)
        for save in meta.saves:
            try:
                self._hold(save)
            except ValueError as exc:  # e.g. a duplicate transfer id: the decode side prefills
                logger.warning("not holding KV for %s: %s", save.transfer_id, exc)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This step's counts (then reset); None when there is nothing to report."""
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, TandemConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return TandemConnectorStats(data=dict(data or {}))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=5)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    # --- worker-side helpers ---

    def _start_io_thread(self) -> None:
        """An asyncio loop on its own thread for the transfer server and pulls."""
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="tandem-kv-connector", daemon=True).start()
        self._loop = loop
        if self._kv_transfer_config.kv_role in ("kv_producer", "kv_both"):
            store = TransferStore(TransferStoreConfig(ttl_s=self.hold_s))
            self._server = KvTransferServer(store, host=self.transfer_host, port=self.transfer_port)
            asyncio.run_coroutine_threadsafe(self._server.start(), loop).result(timeout=10)

    def _block_layout(self) -> tuple[list[int], torch.dtype]:
        first = self._layers[0]
        return [len(self._layers), *first.shape[1:]], first.dtype

    def _hold(self, save: _Save) -> None:
        assert self._server is not None, "a kv_consumer connector holds nothing"
        index = torch.tensor(save.block_ids, dtype=torch.long, device=self._layers[0].device)
        # [blocks, layers, ...one block of one layer]: the export's block-major layout.
        blocks = torch.stack([layer[index] for layer in self._layers], dim=1).contiguous().cpu()
        shape, dtype = self._block_layout()
        seed = seed_for_salt(None)
        export = KVBlockExport(
            block_size=self.block_size,
            dtype=str(dtype).removeprefix("torch."),
            block_shape=shape,
            hash_seed=seed,
            block_hashes=block_hashes(save.token_ids, self.block_size, seed),
            token_ids=save.token_ids,
            data=blocks.view(torch.uint8).numpy().tobytes(),
        )
        self._server.store.hold(save.transfer_id, export)
        self._stats.data["blocks_held"] += len(save.block_ids)

    def _load(self, load: _Load) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            pull_blocks(load.address, load.transfer_id, load.block_indices, timeout_s=PULL_TIMEOUT_S), self._loop
        )
        pulled = future.result(timeout=PULL_TIMEOUT_S + 5)
        try:
            header = pulled.header
            shape, dtype = self._block_layout()
            if list(header.block_shape) != shape or header.dtype != str(dtype).removeprefix("torch."):
                raise ValueError(
                    f"pulled blocks are {header.dtype} {list(header.block_shape)}; this worker's are {dtype} {shape}"
                )
            if list(header.token_ids) != load.token_ids:
                raise ValueError("pulled blocks hold other tokens than this prompt's")
            device = self._layers[0].device
            for position, block_id in enumerate(load.block_ids):
                with warnings.catch_warnings():  # a read-only view, only read from (copied into the cache)
                    warnings.simplefilter("ignore", UserWarning)
                    raw = torch.frombuffer(pulled.block(position), dtype=torch.uint8)
                block = raw.view(dtype).view(shape).to(device)
                for layer_index, layer in enumerate(self._layers):
                    layer[block_id].copy_(block[layer_index])
            self._stats.data["blocks_loaded"] += len(load.block_ids)
        finally:
            # Closing touches the pull's connection, which belongs to the IO loop's thread.
            self._loop.call_soon_threadsafe(pulled.close)

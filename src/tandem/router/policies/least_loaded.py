"""The ``least-loaded`` policy: the worker with the least active work, ignoring KV caches.

Load is measured in KV blocks, in the units of the KV cost (``router/kv/cost.py``) with no cache credit:
``prefill_tokens / block_size + decode_blocks`` from :class:`~tandem.router.kv.active_load.ActiveLoad`
(Dynamo's ``--load-aware`` mode). Ties are broken uniformly at random (seedable).

The policy only reads the load: whoever routes the request books it on the chosen worker
(``ActiveLoad.add_request``) and releases it (``mark_prefill_done`` at the first token, ``free``
at the end), so the next choice sees it.
"""

from __future__ import annotations

import random

from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import seed_for_salt
from tandem.protocols.worker_card import WorkerCard
from tandem.router.kv.active_load import ActiveLoad
from tandem.router.kv.cost import select_worker
from tandem.router.policy import RoutingPolicy


class LeastLoadedPolicy(RoutingPolicy):
    """Picks the candidate with the fewest active prefill blocks + decode blocks."""

    name = "least-loaded"

    def __init__(self, active_load: ActiveLoad, seed: int | None = None) -> None:
        self.active_load = active_load
        self._rng = random.Random(seed)

    def load(self, worker_id: str) -> float:
        """Active prefill tokens (in blocks) + decode blocks of one worker."""
        active = self.active_load
        return active.prefill_tokens(worker_id) / active.block_size + active.decode_blocks(worker_id)

    def select(self, candidates: list[WorkerCard], token_ids: list[int]) -> WorkerCard:
        if not candidates:
            raise ValueError("no candidate workers to select from")
        by_id = {card.worker_id: card for card in candidates}
        loads = {worker_id: self.load(worker_id) for worker_id in by_id}
        return by_id[select_worker(loads, 0.0, self._rng)]

    def route(
        self, candidates: list[WorkerCard], token_ids: list[int], request_id: str | None, cache_salt: str | None
    ) -> WorkerCard:
        """Select, then book the request on the chosen worker (released by the hooks below)."""
        card = self.select(candidates, token_ids)
        if request_id is not None:
            hashes = block_hashes(token_ids, self.active_load.block_size, seed_for_salt(cache_salt))
            self.active_load.add_request(request_id, card.worker_id, hashes, len(token_ids))
        return card

    def on_first_token(self, request_id: str) -> None:
        self.active_load.mark_prefill_done(request_id)

    def on_finished(self, request_id: str) -> None:
        self.active_load.free(request_id)

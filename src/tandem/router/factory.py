"""Build a routing policy by name: one place for the frontend and the standalone router."""

from __future__ import annotations

from typing import Any

from tandem.router.policies import make_policy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.request_plane import RequestPlaneClient


def build_policy(name: str, pool: WorkerPool, client: RequestPlaneClient, kv_config: Any = None) -> Any:
    """``round-robin``, ``random``, ``kv`` (a KvRouter on ``kv_config``) or ``least-loaded``.

    The load-tracking policies follow ``pool`` and use ``client`` for the workers' KV dumps.
    """
    if name in ("kv", "least-loaded"):
        from tandem.router.kv_router import KvRouter, KvRouterConfig

        config = kv_config or KvRouterConfig()
        if name == "kv":
            return KvRouter(pool, client, config)
        from tandem.router.active_load import ActiveLoad
        from tandem.router.policy_least_loaded import LeastLoadedPolicy

        return LeastLoadedPolicy(ActiveLoad(config.block_size), seed=config.seed)
    return make_policy(name)

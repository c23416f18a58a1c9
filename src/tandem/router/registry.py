"""Every ``--router`` choice and how to build it: one place for the frontend and the standalone router.

One module per policy under ``tandem.router.policies``, each imported when built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tandem.router.policy import RoutingPolicy
from tandem.router.worker_pool import WorkerPool
from tandem.runtime.request_plane import RequestPlaneClient

if TYPE_CHECKING:
    from tandem.router.policies.kv import KvRouterConfig

ROUTER_NAMES = ("round-robin", "random", "kv", "least-loaded", "remote")
"""Every ``--router`` choice; ``remote`` is a frontend's handle on a standalone ``tandem router``."""


def _round_robin(pool: WorkerPool, client: RequestPlaneClient, config: KvRouterConfig) -> RoutingPolicy:
    from tandem.router.policies.round_robin import RoundRobinPolicy

    return RoundRobinPolicy()


def _random(pool: WorkerPool, client: RequestPlaneClient, config: KvRouterConfig) -> RoutingPolicy:
    from tandem.router.policies.random_choice import RandomPolicy

    return RandomPolicy(config.seed)


def _kv(pool: WorkerPool, client: RequestPlaneClient, config: KvRouterConfig) -> RoutingPolicy:
    from tandem.router.policies.kv import KvRouter

    return KvRouter(pool, client, config)


def _least_loaded(pool: WorkerPool, client: RequestPlaneClient, config: KvRouterConfig) -> RoutingPolicy:
    from tandem.router.kv.active_load import ActiveLoad
    from tandem.router.policies.least_loaded import LeastLoadedPolicy

    return LeastLoadedPolicy(ActiveLoad(config.block_size), seed=config.seed)


POLICIES: dict[str, Callable[[WorkerPool, RequestPlaneClient, KvRouterConfig], RoutingPolicy]] = {
    "round-robin": _round_robin,
    "random": _random,
    "kv": _kv,
    "least-loaded": _least_loaded,
}
"""The policies a router process can run itself (``remote`` is built by the frontend)."""


def build_policy(
    name: str, pool: WorkerPool, client: RequestPlaneClient, kv_config: KvRouterConfig | None = None
) -> RoutingPolicy:
    """The policy ``name`` (one of POLICIES): the load-tracking ones follow ``pool`` and use
    ``client`` for the workers' KV dumps; ``kv_config`` tunes them (defaults otherwise)."""
    from tandem.router.policies.kv import KvRouterConfig

    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}")
    return factory(pool, client, kv_config or KvRouterConfig())

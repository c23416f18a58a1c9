"""Where workers announce themselves and frontends and routers find them.

``base`` holds the interface (``Discovery``, registrations with a lease, change events) and the
snapshot-diffing helper; each backend is its own module: ``memory`` (one process, tests),
``file`` (one machine, the default of ``tandem serve``) and ``etcd`` (a cluster). Pick one with
:func:`make_discovery`; backends import only ``base``, so importing this package loads none of them.
"""

from __future__ import annotations

from tandem.runtime.discovery.base import Discovery, DiscoveryConfig


def make_discovery(
    spec: str, config: DiscoveryConfig | None = None, *, etcd_endpoints: str | None = None, namespace: str = "tandem"
) -> Discovery:
    """Build a discovery client from a spec.

    ``memory`` (the process-wide in-memory store), ``memory:NAME`` (a named one), ``file``
    (``$TANDEM_CACHE_DIR/discovery``, else ``~/.cache/tandem/discovery``), ``file:/some/dir``,
    ``etcd`` (at ``etcd_endpoints``, a comma-separated ``host:port`` list) or
    ``etcd://host:port[,host:port]``. ``namespace`` scopes etcd keys.
    """
    kind, _, arg = spec.partition(":")
    if kind == "memory":
        from tandem.runtime.discovery.memory import MemoryDiscovery, shared_store

        return MemoryDiscovery(shared_store(arg or "default"), config)
    if kind == "file":
        from tandem.runtime.discovery.file import FileDiscovery

        return FileDiscovery(arg or None, config)
    if kind == "etcd":
        endpoints = arg.removeprefix("//") or etcd_endpoints or "127.0.0.1:2379"
        from tandem.runtime.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(endpoints, namespace=namespace, config=config)
    raise ValueError(
        f"unknown discovery spec {spec!r}: expected 'memory', 'file', 'file:/dir', 'etcd' or 'etcd://host:port'"
    )

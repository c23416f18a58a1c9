"""Deployment graphs: which components run, how many of each, with which flags.

A graph is a YAML file (``examples/graphs/*.yaml``)::

    frontend:            # optional; these are the defaults
      host: 127.0.0.1
      port: 8000
      router: round-robin
    discovery: file      # optional; `tandem serve` uses a private directory when omitted
    event_plane: zmq     # optional; zmq (the default) or nats, with nats_url
    nats_url: nats://127.0.0.1:4222
    workers:
      - count: 1
        engine: builtin  # builtin | vllm | mocker
        role: agg        # agg | prefill | decode
        model: smollm2-135m-instruct
        flags:           # any `tandem worker` flag, without the leading dashes
          dtype: float32
          kv-cache-gib: 1
        vllm:            # engine: vllm only: any vLLM engine argument (`--vllm-arg KEY=VALUE`)
          enforce_eager: true

``load_graph`` validates it and raises :class:`GraphError` with the path of the bad field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tandem.frontend.config import FrontendConfig
from tandem.router.registry import ROUTER_NAMES
from tandem.runtime.event_plane.config import EVENT_PLANES

ENGINES = ("builtin", "vllm", "mocker")
ROLES = ("agg", "prefill", "decode")
DEFAULT_MODEL = "smollm2-135m-instruct"


class GraphError(ValueError):
    """The graph file is malformed."""


@dataclass
class WorkerGroup:
    count: int = 1
    engine: str = "builtin"
    role: str = "agg"
    model: str = DEFAULT_MODEL
    flags: dict[str, Any] = field(default_factory=dict)
    """Extra `tandem worker` flags (name without dashes → value; True for a bare switch)."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """``engine: vllm``: vLLM engine arguments (name → value), passed as ``--vllm-arg``."""

    def worker_argv(self) -> list[str]:
        """The `tandem worker` arguments for one worker of this group (discovery excluded)."""
        argv = ["--engine", self.engine, "--role", self.role, "--model", self.model]
        for name, value in self.flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif isinstance(value, list):  # a flag with several values, e.g. mocker-decode-coeffs: [0, 0, 10]
                argv += [flag, *map(str, value)]
            elif value is not False and value is not None:
                argv += [flag, str(value)]
        if self.vllm:
            argv += ["--vllm-arg", *(f"{name}={json.dumps(value)}" for name, value in self.vllm.items())]
        return argv


@dataclass
class Graph:
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    workers: list[WorkerGroup] = field(default_factory=lambda: [WorkerGroup()])
    discovery: str | None = None
    event_plane: str = "zmq"
    """How workers send KV events to the frontend's router: ``zmq`` or ``nats``."""
    nats_url: str | None = None
    """``nats``: the NATS server(s); None: ``tandem worker``'s default (``$TANDEM_NATS_URL`` or
    nats://127.0.0.1:4222), which the frontend then finds in the workers' cards."""

    def set_event_plane(self, kind: str, nats_url: str | None = None) -> None:
        """Use ``kind`` for every worker (and ``nats_url`` when given); with ``nats`` the
        frontend's router follows the same server."""
        if kind not in EVENT_PLANES:
            raise GraphError(f"event_plane must be one of {EVENT_PLANES}, got {kind!r}")
        self.event_plane = kind
        if nats_url is not None:
            self.nats_url = nats_url
        if kind == "nats" and self.nats_url is not None:
            self.frontend.nats_url = self.nats_url  # else it follows the server named in the workers' cards

    def event_plane_argv(self) -> list[str]:
        """The event-plane flags every worker of the graph gets."""
        argv = ["--event-plane", self.event_plane]
        if self.event_plane == "nats" and self.nats_url:
            argv += ["--nats-url", self.nats_url]
        return argv

    @property
    def models(self) -> list[str]:
        return sorted({g.flags.get("served-model-name") or g.model for g in self.workers})


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise GraphError(f"{where}: expected {name}, got {value!r}")
    return value


# FrontendConfig field annotation → the YAML value types it accepts (bool is never an int here).
_FRONTEND_KINDS = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
    "float | None": (int, float, type(None)),
}


def _frontend(data: Any) -> FrontendConfig:
    data = _expect(data or {}, dict, "frontend")
    fields = FrontendConfig.__dataclass_fields__
    unknown = set(data) - set(fields)
    if unknown:
        raise GraphError(f"frontend: unknown keys {sorted(unknown)} (known: {sorted(fields)})")
    for name, value in data.items():
        kinds = _FRONTEND_KINDS.get(str(fields[name].type))
        if kinds is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise GraphError(f"frontend.{name}: expected {fields[name].type}, got {value!r}")
    if data.get("router", "round-robin") not in ROUTER_NAMES:
        raise GraphError(f"frontend.router must be one of {ROUTER_NAMES}, got {data['router']!r}")
    try:
        return FrontendConfig(**data)
    except (TypeError, ValueError) as exc:
        raise GraphError(f"frontend: {exc}") from None


def _group(data: Any, where: str) -> WorkerGroup:
    data = _expect(data, dict, where)
    unknown = set(data) - {"count", "engine", "role", "model", "flags", "vllm"}
    if unknown:
        raise GraphError(f"{where}: unknown keys {sorted(unknown)}")
    group = WorkerGroup(
        count=_expect(data.get("count", 1), int, f"{where}.count"),
        engine=_expect(data.get("engine", "builtin"), str, f"{where}.engine"),
        role=_expect(data.get("role", "agg"), str, f"{where}.role"),
        model=_expect(data.get("model", DEFAULT_MODEL), str, f"{where}.model"),
        flags=dict(_expect(data.get("flags") or {}, dict, f"{where}.flags")),
        vllm=dict(_expect(data.get("vllm") or {}, dict, f"{where}.vllm")),
    )
    if group.count < 0:
        raise GraphError(f"{where}.count must be >= 0, got {group.count}")
    if group.engine not in ENGINES:
        raise GraphError(f"{where}.engine must be one of {ENGINES}, got {group.engine!r}")
    if group.role not in ROLES:
        raise GraphError(f"{where}.role must be one of {ROLES}, got {group.role!r}")
    if group.vllm and group.engine != "vllm":
        raise GraphError(f"{where}.vllm: vLLM engine arguments need engine: vllm, not {group.engine!r}")
    for name in group.vllm:
        _expect(name, str, f"{where}.vllm key")
    for name, value in group.flags.items():
        if name in ("discovery", "engine", "role", "model"):
            raise GraphError(f"{where}.flags.{name}: set it as a key of the worker group, not a flag")
        if name in ("event-plane", "nats-url", "event_plane", "nats_url"):
            raise GraphError(
                f"{where}.flags.{name}: set it at the top of the graph (event_plane, nats_url): "
                "every worker and the frontend must agree on it"
            )
        for item in value if isinstance(value, list) else [value]:
            _expect(item, (str, int, float, bool), f"{where}.flags.{name}")
    return group


def parse_graph(data: Any, source: str = "graph") -> Graph:
    data = _expect(data, dict, source)
    known = {"frontend", "workers", "discovery", "event_plane", "nats_url"}
    unknown = set(data) - known
    if unknown:
        raise GraphError(f"{source}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
    groups = _expect(data.get("workers", [{}]), list, "workers")
    if not groups:
        raise GraphError("workers: at least one worker group is needed")
    discovery = data.get("discovery")
    if discovery is not None:
        _expect(discovery, str, "discovery")
    nats_url = data.get("nats_url")
    if nats_url is not None:
        _expect(nats_url, str, "nats_url")
    graph = Graph(
        frontend=_frontend(data.get("frontend")),
        workers=[_group(g, f"workers[{i}]") for i, g in enumerate(groups)],
        discovery=discovery,
    )
    graph.set_event_plane(_expect(data.get("event_plane", "zmq"), str, "event_plane"), nats_url)
    return graph


def load_graph(path: str | Path) -> Graph:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise GraphError(f"cannot read graph {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GraphError(f"{path} is not valid YAML: {exc}") from None
    return parse_graph(data, str(path))

"""Runs of the network-namespace test bed: how their namespaces are named, who owns them, and
how leftovers of dead runs are found and removed.

A run's namespaces are named ``PREFIX-RUNID-HOST`` (``tandem-tb-3fa9c1-worker1``); its switch
namespace is ``PREFIX-RUNID-switch`` and holds the bridge ``br0``, whose interface alias records
the owner: ``tandem-testbed owner=PID:STARTTIME`` (the owning process and its start time in
clock ticks, so a recycled pid is not mistaken for the owner) or ``owner=detached`` for a bed
built by ``netns_testbed up`` that lives until ``down``. The state lives in the kernel objects
themselves: there is no state file to go stale.

A run is *dead* when its owner process is gone, or when its switch namespace or mark is missing
(a run that crashed while being built). Building a run takes a few milliseconds between adding
the switch namespace and marking it; a cleanup that runs in exactly that window removes it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from tests.testbed.netns import delete_namespace, ip, kill_namespace_processes, list_namespaces

DEFAULT_PREFIX = "tandem-tb"
"""Namespace names of every run start with this (and a dash)."""
SWITCH = "switch"
"""Host name of the namespace that holds the bridge (reserved: no host may be called this)."""
BRIDGE = "br0"
"""The bridge device in the switch namespace."""
RUN_ID_HEX_DIGITS = 6
_MARK = "tandem-testbed owner="
DETACHED = "detached"


def new_run_id() -> str:
    """A short random run id (6 hex digits), so parallel runs never share a name."""
    return secrets.token_hex(RUN_ID_HEX_DIGITS // 2)


def namespace_name(prefix: str, run_id: str, host: str) -> str:
    return f"{prefix}-{run_id}-{host}"


def _name_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-([0-9a-f]{{{RUN_ID_HEX_DIGITS}}})-([a-z][a-z0-9]*)$")


def process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall: fields[0] is field 3


def owner_mark(pid: int | None) -> str:
    """The bridge alias naming the owner: process ``pid`` (this one's start time), or detached if None."""
    if pid is None:
        return _MARK + DETACHED
    return f"{_MARK}{pid}:{process_start_ticks(pid)}"


def write_owner_mark(switch_namespace: str, pid: int | None) -> None:
    ip("link", "set", BRIDGE, "alias", owner_mark(pid), namespace=switch_namespace)


def read_owner_mark(switch_namespace: str) -> str | None:
    """The owner part of the bridge alias (``PID:TICKS`` or ``detached``), None if unmarked."""
    out = ip("-j", "link", "show", BRIDGE, namespace=switch_namespace, check=False)
    try:
        alias = json.loads(out)[0].get("ifalias", "")
    except (ValueError, IndexError, AttributeError):
        return None
    return alias[len(_MARK) :] if alias.startswith(_MARK) else None


def owner_alive(owner: str | None) -> bool:
    """True if ``owner`` (from :func:`read_owner_mark`) is a process that still runs."""
    if owner is None or owner == DETACHED:
        return False
    pid, _, ticks = owner.partition(":")
    return pid.isdigit() and str(process_start_ticks(int(pid))) == ticks


@dataclass
class RunInfo:
    """One run found on this machine."""

    run_id: str
    namespaces: dict[str, str] = field(default_factory=dict)
    """host → namespace name (the switch included)."""
    owner: str | None = None
    """``PID:TICKS``, ``detached``, or None when the switch namespace or its mark is missing."""

    @property
    def state(self) -> str:
        """``alive`` (its owner runs), ``detached`` (built by ``up``) or ``dead``."""
        if self.owner == DETACHED:
            return "detached"
        return "alive" if owner_alive(self.owner) else "dead"


def list_runs(prefix: str = DEFAULT_PREFIX) -> list[RunInfo]:
    """Every run whose namespaces carry ``prefix``, sorted by run id."""
    pattern, runs = _name_pattern(prefix), {}
    for name in list_namespaces():
        match = pattern.match(name)
        if match:
            run = runs.setdefault(match.group(1), RunInfo(match.group(1)))
            run.namespaces[match.group(2)] = name
    for run in runs.values():
        if SWITCH in run.namespaces:
            run.owner = read_owner_mark(run.namespaces[SWITCH])
    return sorted(runs.values(), key=lambda run: run.run_id)


def remove_namespaces(names: list[str], grace_s: float = 3.0) -> None:
    """Kill the processes inside each namespace, then delete them (hosts first, the switch last)."""
    for name in names:
        kill_namespace_processes(name, grace_s)
    for name in sorted(names, key=lambda n: n.endswith(f"-{SWITCH}")):
        delete_namespace(name)


def remove_run(run: RunInfo, grace_s: float = 3.0) -> None:
    remove_namespaces(list(run.namespaces.values()), grace_s)


def cleanup(prefix: str = DEFAULT_PREFIX, include_detached: bool = False, grace_s: float = 3.0) -> list[str]:
    """Remove the runs whose owner is dead (and detached ones if asked); returns their run ids.

    Runs whose owner still runs are never touched, so this is safe beside parallel test runs.
    """
    removed = []
    for run in list_runs(prefix):
        if run.state == "dead" or (include_detached and run.state == "detached"):
            remove_run(run, grace_s)
            removed.append(run.run_id)
    return removed

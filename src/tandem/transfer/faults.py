"""Fault injection for the KV transfer server — for tests only, never for production.

A `KvTransferServer` reads ``TANDEM_FAULT_TRANSFER`` once, when it is constructed. Unset or empty
(the default) means no fault and no cost: the server keeps ``faults = None`` and every pull takes
the normal path. Otherwise it names the fault applied to every pull this server serves:

- ``corrupt``: flip one payload byte *after* the checksum was computed (TCP and shm alike), so
  the client's integrity check fails (`TransferError` reason "checksum").
- ``truncate``: send the response over TCP (never shm) with only half of the payload, then hang
  up (`TransferError` reason "truncated").
- ``delay:SECONDS``: sleep that long before serving the pull (makes "the client leaves while the
  decode worker is pulling" deterministic).
- ``file:PATH``: read one of the above from PATH at every pull (missing or empty file: no
  fault), so an end-to-end test can switch the fault of a running worker process.

A bad value raises ValueError when the server is constructed, so a typo never silently runs
a test without its fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

ENV_VAR = "TANDEM_FAULT_TRANSFER"


@dataclass(frozen=True)
class TransferFault:
    """One injected fault (see module docstring)."""

    kind: Literal["corrupt", "truncate", "delay"]
    delay_s: float = 0.0


def parse_fault(spec: str) -> TransferFault | None:
    """``corrupt``, ``truncate`` or ``delay:SECONDS`` (blank: None); ValueError otherwise."""
    spec = spec.strip()
    if not spec:
        return None
    if spec == "corrupt":
        return TransferFault("corrupt")
    if spec == "truncate":
        return TransferFault("truncate")
    kind, _, seconds = spec.partition(":")
    if kind == "delay":
        try:
            delay_s = float(seconds)
        except ValueError:
            delay_s = -1.0
        if delay_s >= 0:
            return TransferFault("delay", delay_s)
    raise ValueError(f"{ENV_VAR} must be 'corrupt', 'truncate', 'delay:SECONDS' or 'file:PATH', got {spec!r}")


class FaultSource:
    """The fault to apply to the next pull: a fixed one, or whatever a file says right now."""

    def __init__(self, fixed: TransferFault | None = None, path: str | None = None) -> None:
        self.fixed, self.path = fixed, path

    def current(self) -> TransferFault | None:
        if self.path is None:
            return self.fixed
        try:
            with open(self.path, encoding="utf-8") as handle:
                return parse_fault(handle.read())
        except OSError:
            return None


def faults_from_env(environ: Mapping[str, str] | None = None) -> FaultSource | None:
    """The configured fault source, or None when ``TANDEM_FAULT_TRANSFER`` is unset or empty."""
    spec = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not spec:
        return None
    if spec.startswith("file:"):
        return FaultSource(path=spec.removeprefix("file:"))
    return FaultSource(parse_fault(spec))


def corrupt_runs(runs: list[memoryview]) -> list[memoryview]:
    """The payload runs with one byte of the first non-empty run flipped (a copy; the held
    export is untouched, so a later honest pull still gets the right bytes)."""
    for index, run in enumerate(runs):
        if len(run):
            bad = bytearray(run)
            bad[len(bad) // 2] ^= 0xFF
            return [*runs[:index], memoryview(bad), *runs[index + 1 :]]
    return runs


def truncate_runs(runs: list[memoryview]) -> list[memoryview]:
    """The first half of the payload's bytes."""
    keep = sum(len(run) for run in runs) // 2
    kept: list[memoryview] = []
    for run in runs:
        if keep <= 0:
            break
        kept.append(run[:keep])
        keep -= len(kept[-1])
    return kept

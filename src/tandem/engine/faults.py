"""Fault injection for the engine thread — for tests only, never for production.

An `AsyncEngine` reads ``TANDEM_FAULT_ENGINE`` once, when it is constructed. Unset or empty (the
default) means no fault and no cost. Otherwise:

- ``fail_after_steps:N``: the engine runs N steps normally, then its next step raises a fatal
  error, as a GPU fault would: the engine thread dies, its requests fail with EngineDeadError,
  and a worker withdraws from discovery and exits non-zero.

A bad value raises ValueError when the engine is constructed, so a typo never silently runs a
test without its fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_VAR = "TANDEM_FAULT_ENGINE"


@dataclass(frozen=True)
class EngineFault:
    """One injected fault (see module docstring)."""

    fail_after_steps: int
    """Steps that succeed before the failing one."""

    def fails_at(self, steps_done: int) -> bool:
        """Whether the step after ``steps_done`` successful ones must fail."""
        return steps_done >= self.fail_after_steps

    def __str__(self) -> str:
        return f"{ENV_VAR}=fail_after_steps:{self.fail_after_steps}"


def parse_engine_fault(spec: str) -> EngineFault | None:
    """``fail_after_steps:N`` with N >= 0 (blank: None); ValueError otherwise."""
    spec = spec.strip()
    if not spec:
        return None
    kind, _, count = spec.partition(":")
    if kind == "fail_after_steps" and count.strip().isdigit():
        return EngineFault(int(count))
    raise ValueError(f"{ENV_VAR} must be 'fail_after_steps:N' (N >= 0), got {spec!r}")


def engine_fault_from_env(environ: Mapping[str, str] | None = None) -> EngineFault | None:
    """The configured fault, or None when ``TANDEM_FAULT_ENGINE`` is unset or empty."""
    return parse_engine_fault((os.environ if environ is None else environ).get(ENV_VAR, ""))

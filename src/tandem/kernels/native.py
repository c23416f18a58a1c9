"""Compile-on-first-use for Tandem's small C libraries, cached in the Tandem cache.

A library is built with the system C compiler (``$CC``, ``cc`` or ``gcc``) into
``<cache>/kernels/<name>-<digest>.so``, the digest covering the sources, the flags and the
CPU's feature flags, so an edited source or another CPU gets its own build. The build writes to a
temporary file and renames it, so concurrent builders never load a half-written library.
Callers catch :class:`NativeUnavailable` and fall back to their pure-Python path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

Signatures: TypeAlias = Mapping[str, tuple[Sequence[type], object]]
"""C function name → (ctypes argtypes, ctypes restype or None), as given to :func:`load_library`."""


class NativeUnavailable(RuntimeError):
    """The library could not be built or loaded (no compiler, missing system library, ...)."""


@functools.cache
def _cpuinfo_flags_line() -> str | None:
    """The ``flags`` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    line = _cpuinfo_flags_line()
    return frozenset(line.split(":", 1)[1].split()) if line else frozenset()


def _cpu_id() -> str:
    return _cpuinfo_flags_line() or platform.processor()


BUILD_RECIPE = 2
"""Bumped when `_build` changes how it builds (2: compile and link as separate steps)."""


def library_path(name: str, sources: list[Path], flags: list[str], headers: Sequence[Path] = ()) -> Path:
    """Where the build of ``sources`` (including ``headers``) with ``flags`` lives in the cache."""
    from tandem.model_cache import cache_dir

    digest = hashlib.sha256(f"{BUILD_RECIPE} {' '.join(flags)}".encode() + _cpu_id().encode())
    for source in [*sources, *headers]:
        digest.update(source.read_bytes())
    return cache_dir() / "kernels" / f"{name}-{digest.hexdigest()[:16]}.so"


def _build(target: Path, sources: list[Path], flags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler (cc/gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        objects = []
        for index, source in enumerate(sources):
            objects.append(str(Path(tmp) / f"{index}-{source.stem}.o"))
            _run([compiler, "-c", *_compile_flags(flags), str(source), "-o", objects[-1]])
        _run([compiler, *_link_flags(flags), *objects, *_libraries(flags), "-o", str(out)])
        os.replace(out, target)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise NativeUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-2000:]}")


_LINK_ONLY = ("-shared",)
_LINK_TOO = ("-fopenmp", "-fPIC", "-march=native")


def _compile_flags(flags: list[str]) -> list[str]:
    return [f for f in flags if not f.startswith("-l") and f not in _LINK_ONLY]


def _link_flags(flags: list[str]) -> list[str]:
    # Compile-only flags stay out of the link: linking with -ffast-math would add GCC's
    # crtfastmath.o, whose constructor sets flush-to-zero for the whole process on load.
    return [f for f in flags if f in _LINK_ONLY or f in _LINK_TOO]


def _libraries(flags: list[str]) -> list[str]:
    # Libraries go after the objects, or the linker drops them as unused.
    return [f for f in flags if f.startswith("-l")]


def load_library(
    name: str,
    sources: list[Path],
    flags: list[str],
    signatures: Signatures,
    headers: Sequence[Path] = (),
) -> ctypes.CDLL:
    """Build (once) and load a C library; ``signatures`` maps function → (argtypes, restype).

    Raises :class:`NativeUnavailable` when it cannot be built or loaded.
    """
    try:
        path = library_path(name, sources, flags, headers)
        if not path.is_file():
            _build(path, sources, flags)
        lib = ctypes.CDLL(str(path))
        for function, (argtypes, restype) in signatures.items():
            getattr(lib, function).argtypes = argtypes
            getattr(lib, function).restype = restype
    except (OSError, AttributeError) as exc:
        raise NativeUnavailable(str(exc)) from exc
    return lib


class LazyLibrary:
    """A kernel library built and loaded on first use, once per process.

    Calling it returns the library, or None when it cannot be built (logged once, with what the
    caller falls back to) or when the environment variable ``disable_env`` is ``1``."""

    def __init__(
        self,
        name: str,
        sources: list[Path],
        flags: list[str],
        signatures: Signatures,
        headers: Sequence[Path] = (),
        disable_env: str | None = None,
        fallback: str = "",
    ) -> None:
        self.name, self.sources, self.flags, self.signatures = name, sources, flags, signatures
        self.headers, self.disable_env, self.fallback = headers, disable_env, fallback
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def __call__(self) -> ctypes.CDLL | None:
        if not self._tried:
            self._tried = True
            if self.disable_env and os.environ.get(self.disable_env) == "1":
                return None
            try:
                self._lib = load_library(self.name, self.sources, self.flags, self.signatures, self.headers)
            except NativeUnavailable as exc:
                logging.getLogger(__name__).warning("%s unavailable (%s); %s", self.name, exc, self.fallback)
        return self._lib

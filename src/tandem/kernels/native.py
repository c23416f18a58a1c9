"""Compile-on-first-use for Tandem's small C libraries, cached in the Tandem cache.

A library is built with the system C compiler (``$CC``, ``cc`` or ``gcc``) into
``<cache>/kernels/<name>-<digest>.so``, the digest covering the sources, the flags and the
CPU's feature flags, so an edited source or another CPU gets its own build. The build writes to a
temporary file and renames it, so concurrent builders never load a half-written library.
Callers catch :class:`NativeUnavailable` and fall back to their pure-Python path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


class NativeUnavailable(RuntimeError):
    """The library could not be built or loaded (no compiler, missing system library, ...)."""


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def library_path(name: str, sources: list[Path], flags: list[str]) -> Path:
    """Where the build of ``sources`` with ``flags`` lives in the cache."""
    from tandem.model_cache import cache_dir

    digest = hashlib.sha256(" ".join(flags).encode() + _cpu_id().encode())
    for source in sources:
        digest.update(source.read_bytes())
    return cache_dir() / "kernels" / f"{name}-{digest.hexdigest()[:16]}.so"


def _build(target: Path, sources: list[Path], flags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeUnavailable("no C compiler (cc/gcc) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_compile_flags(flags), *map(str, sources), *_link_flags(flags), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-2000:]}")
        os.replace(out, target)


def _compile_flags(flags: list[str]) -> list[str]:
    return [f for f in flags if not f.startswith("-l")]


def _link_flags(flags: list[str]) -> list[str]:
    # Libraries go after the sources, or the linker drops them as unused.
    return [f for f in flags if f.startswith("-l")]


def load_library(name: str, sources: list[Path], flags: list[str],
                 signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """Build (once) and load a C library; ``signatures`` maps function → (argtypes, restype).

    Raises :class:`NativeUnavailable` when it cannot be built or loaded.
    """
    try:
        path = library_path(name, sources, flags)
        if not path.is_file():
            _build(path, sources, flags)
        lib = ctypes.CDLL(str(path))
        for function, (argtypes, restype) in signatures.items():
            getattr(lib, function).argtypes = argtypes
            getattr(lib, function).restype = restype
    except (OSError, AttributeError) as exc:
        raise NativeUnavailable(str(exc)) from exc
    return lib

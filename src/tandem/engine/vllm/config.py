"""What a vLLM worker runs: Tandem's engine flags mapped onto vLLM's ``AsyncEngineArgs``.

Tandem's flags set the common knobs (dtype, block size, context length, prefix caching, KV budget,
batch limits); ``--vllm-arg KEY=VALUE`` (or a graph's ``vllm:`` mapping) passes any other
``AsyncEngineArgs`` field through, and wins over the mapped ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tandem.model_cache.errors import ModelLoadError

GIB = 1 << 30


@dataclass(frozen=True)
class VllmEngineConfig:
    model_dir: str
    """HF model directory vLLM loads (a Tandem cache entry resolves to one)."""
    dtype: str = "auto"
    """``auto``, ``float32``, ``bfloat16`` or ``float16`` (vLLM's ``dtype``). On vLLM's CPU build,
    float32 with eager mode is the combination that gave exact text on SmolLM2 (bf16 + eager did not)."""
    block_size: int | None = None
    """Tokens per KV block; None: vLLM's platform default. vLLM's CPU attention needs a multiple of 32."""
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's."""
    enable_prefix_caching: bool = True
    kv_cache_gib: float | None = None
    """KV cache budget (vLLM's ``kv_cache_memory_bytes``); None: vLLM's default (GPU memory
    utilization on CUDA, ``VLLM_CPU_KVCACHE_SPACE`` on CPU)."""
    num_kv_blocks: int | None = None
    """Exact KV pool size (vLLM's ``num_gpu_blocks_override``)."""
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``AsyncEngineArgs`` field, by name (``--vllm-arg``); applied last."""

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``AsyncEngineArgs`` keyword arguments (without the KV events config)."""
        kwargs: dict[str, Any] = {
            "model": self.model_dir,
            "dtype": self.dtype,
            "enable_prefix_caching": self.enable_prefix_caching,
        }
        optional = {
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "kv_cache_memory_bytes": int(self.kv_cache_gib * GIB) if self.kv_cache_gib is not None else None,
            "num_gpu_blocks_override": self.num_kv_blocks,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
        }
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        kwargs.update(self.extra)
        return kwargs


def parse_vllm_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings → keyword arguments. A value is read as JSON when it parses
    (``true``, ``4``, ``0.9``, ``{"a": 1}``), else kept as a string; dashes in keys become
    underscores (``enforce-eager=true`` = ``enforce_eager=true``)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parsed[key.strip().replace("-", "_")] = value
    return parsed


def check_engine_arg_names(kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming any key that is not an ``AsyncEngineArgs`` field (needs vLLM)."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown vLLM engine argument(s) {unknown}; see `vllm serve --help` for the names")


def model_dir_for(model: str) -> tuple[str, str]:
    """(served name, HF directory) of a model-cache name, HF directory or GGUF file with an HF
    directory beside it in the cache."""
    from tandem.model_cache import resolve_model

    resolved = resolve_model(model, progress=False)
    if resolved.hf_dir is None:
        raise ModelLoadError(f"the vllm engine needs an HF model directory; {model!r} is only a GGUF file")
    return resolved.name, str(resolved.hf_dir)

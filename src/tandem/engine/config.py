"""Typed configuration of the builtin engine, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.models.dtype import DTYPE_CHOICES
from tandem.protocols.block_hash import DEFAULT_BLOCK_SIZE


@dataclass
class EngineConfig:
    """Everything that shapes one engine instance."""

    model: str = "smollm2-135m-instruct"
    """A model-cache name, an HF directory (config.json + safetensors) or a .gguf file."""
    dtype: str = "auto"
    """Weights and KV cache dtype: auto, float32, bfloat16 or float16. auto is bfloat16 on a CPU
    with AVX512-BF16 or AMX and on CUDA (float16 on GPUs without bfloat16), else float32."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default (one per core)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV block; must match what the router hashes."""
    num_kv_blocks: int | None = None
    """Exact KV pool size in blocks; when None it is derived from kv_cache_memory_gib."""
    kv_cache_memory_gib: float = 1.0
    """KV pool budget in GiB, used when num_kv_blocks is None."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill chunks."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; None takes the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes (keyed by the block-hashing contract)."""
    enable_kv_events: bool = True
    """Record BlockStored/BlockRemoved/AllBlocksCleared for the router."""
    seed: int = 0
    """Seed of the sampler's generator for requests that bring no seed."""
    kv_tiers: KvTierConfig = field(default_factory=KvTierConfig)
    """Host-memory and disk tiers below the KV pool (none by default)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.kv_tiers.enabled and not self.enable_prefix_caching:
            raise ValueError("KV tiers need prefix caching (they are keyed by its block hashes)")

"""Builds a ready-to-run model (weights, tokenizer, shape) from a name, HF directory or GGUF file."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tandem.model_cache.errors import ModelLoadError
from tandem.models.config import ModelConfig
from tandem.models.dtype import resolve_dtype
from tandem.models.llama import LlamaForCausalLM
from tandem.models.tokenizer import load_hf_tokenizer, load_tokenizer  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    model: LlamaForCausalLM
    config: ModelConfig
    hf_config: dict[str, Any]
    tokenizer: Any
    """A transformers tokenizer (fast when available), carrying the chat template."""
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: list[int]
    source: str
    """Where the weights came from: the HF directory or GGUF path."""


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r} (use cpu or cuda)")
    return dev


def read_hf_dir(hf_dir: Path) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """config.json and a lazy iterator over the directory's safetensors weights.

    Tensors are read one at a time, so loading never holds a second full copy of the model.
    """
    config_path = hf_dir / "config.json"
    files = sorted(hf_dir.glob("*.safetensors"))
    if not config_path.is_file() or not files:
        raise ModelLoadError(f"{hf_dir} is not an HF model directory (needs config.json and *.safetensors)")
    hf_config = json.loads(config_path.read_text())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), framework="pt") as reader:
                for name in reader.keys():  # noqa: SIM118 - a safetensors reader is not iterable
                    yield name, reader.get_tensor(name)

    return hf_config, tensors()


def _eos_ids(cfg: ModelConfig, tokenizer: Any, hf_dir: Path | None) -> list[int]:
    ids = set(cfg.eos_token_ids)
    gen_path = hf_dir / "generation_config.json" if hf_dir else None
    if gen_path and gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def build_model(
    cfg: ModelConfig,
    weights: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
) -> LlamaForCausalLM:
    """Instantiate without random init (meta device), then load weights on the target device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=max_model_len)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_buffers(device)
    model.load_hf_state_dict(weights.items() if isinstance(weights, dict) else weights)
    model.prepare_for_inference()
    return model.eval()


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", max_model_len: int | None = None
) -> LoadedModel:
    """Resolve (pulling a known model into the cache on first use) and load a model.

    ``dtype`` may be ``auto`` (see `tandem.models.dtype.resolve_dtype`)."""
    from tandem.model_cache import resolve_model

    start = time.perf_counter()
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    torch_dtype, torch_device = DTYPES[dtype], resolve_device(device)
    resolved = resolve_model(name_or_path)
    weights: Iterable[tuple[str, torch.Tensor]]
    if resolved.hf_dir is not None:
        hf_config, weights = read_hf_dir(resolved.hf_dir)
        tokenizer = load_hf_tokenizer(resolved.hf_dir)
    else:
        from tandem.model_cache.gguf_loader import load_gguf, load_gguf_tokenizer

        assert resolved.gguf_path is not None  # a resolved model has an HF directory or a GGUF file
        gguf = load_gguf(resolved.gguf_path)
        hf_config, weights = gguf.config, gguf.state_dict.items()
        tokenizer = load_gguf_tokenizer(resolved.gguf_path, chat_template=gguf.chat_template or "")
    cfg = ModelConfig.from_hf_dict(hf_config)
    context = max_model_len or cfg.max_position_embeddings
    if context > cfg.max_position_embeddings:
        raise ModelLoadError(f"max_model_len {context} exceeds the model's context of {cfg.max_position_embeddings}")
    model = build_model(cfg, weights, torch_dtype, torch_device, context)
    eos = _eos_ids(cfg, tokenizer, resolved.hf_dir)
    source = resolved.source
    logger.info("loaded %s from %s in %.1fs", resolved.name, source, time.perf_counter() - start)
    return LoadedModel(resolved.name, model, cfg, hf_config, tokenizer, torch_dtype, torch_device, context, eos, source)

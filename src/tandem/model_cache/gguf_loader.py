"""Load a GGUF file as an HF-style config dict and a float32 state dict with HF parameter names.

Supported ``general.architecture`` values: ``llama`` (Llama, SmolLM, Mistral), ``qwen2``, ``qwen3``.
Quantized tensors are dequantized with ``gguf.quants.dequantize``. llama.cpp's converter permutes
the rows of the llama q/k projections into its interleaved-rope layout; we undo that here, so the
result equals the HF checkpoint the GGUF was made from (up to quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.model_cache.errors import ModelLoadError
from tandem.model_cache.gguf_names import expected_shapes, hf_parameter_name

# general.architecture -> (HF architectures entry, HF model_type)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


@dataclass
class GGUFModel:
    """A GGUF file read into HF form."""

    config: dict[str, Any]
    """What the equivalent HF model's config.json holds."""
    state_dict: dict[str, torch.Tensor]
    """float32 tensors under HF parameter names."""
    chat_template: str | None
    """The ``tokenizer.chat_template`` metadata, if any."""


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped), or ModelLoadError saying what is wrong."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a GGUF file (it is a directory or special file): {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (bad magic {magic!r}, expected b'GGUF'): {path}")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # truncated or corrupt file
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc


def _scalar(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar (number, bool or string) metadata value, or ``default`` when the key is absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
        return default
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def _architecture(reader: Any, path: Path) -> str:
    arch: object = _scalar(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} in {path}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _config_from_reader(reader: Any, path: Path) -> dict[str, Any]:
    arch = _architecture(reader, path)
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        return _scalar(reader, f"{arch}.{key}", default)

    hidden = meta("embedding_length")
    num_heads = meta("attention.head_count")
    if hidden is None or num_heads is None or "token_embd.weight" not in tensors:
        raise ModelLoadError(f"GGUF file {path} lacks {arch}.embedding_length/head_count or token_embd")
    head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // num_heads
    theta = float(meta("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": int(hidden),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": int(num_heads),
        "num_key_value_heads": int(meta("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(meta("context_length", 2048)),
        # Rows of the embedding matrix (GGUF shapes list the fastest dimension first).
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if model_type == "llama":
        config["mlp_bias"] = False
    rope_scaling = _rope_scaling(reader, arch, tensors, theta, int(head_dim), path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    config.update(_special_token_ids(reader))
    return config


def _special_token_ids(reader: Any) -> dict[str, Any]:
    """bos/eos/pad ids; eos becomes a list when the file also names end-of-turn tokens."""
    ids: dict[str, Any] = {}
    bos = _scalar(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    eos = [_scalar(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(int(e) for e in eos if e is not None))
    if eos_ids:
        ids["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = _scalar(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        ids["pad_token_id"] = int(pad)
    return ids


def _rope_scaling(
    reader: Any, arch: str, tensors: dict[str, Any], theta: float, head_dim: int, path: Path
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` metadata or a llama3 ``rope_freqs`` tensor."""
    kind = _scalar(reader, f"{arch}.rope.scaling.type")
    factor = _scalar(reader, f"{arch}.rope.scaling.factor")
    original = _scalar(reader, f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor is not None:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if kind == "yarn" and original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" not in tensors:
        return None
    return _llama3_scaling(_dequantize(tensors["rope_freqs.weight"]).reshape(-1), theta, head_dim, path)


def _llama3_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """Recover Llama 3.x rope_scaling from llama.cpp's per-frequency divisors, verifying the fit."""
    factor = float(rope_freqs.max())
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # Divisors llama.cpp would have written for these (Llama 3.1-3.3) parameters.
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192 / 1.0, factor, 1.0 / ((1 - smooth) / factor + smooth))
    )
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-3):
        raise ModelLoadError(f"GGUF file {path}: rope_freqs tensor does not match Llama 3 rope scaling")
    return scaling


def _dequantize(tensor: Any) -> np.ndarray:
    """A reader tensor as a fresh float32 array in numpy (row-major, HF) shape."""
    from gguf import quants

    values = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # np.array copies: F32/F16 data are views of the memory map.
    return np.array(values, dtype=np.float32, order="C").reshape(shape)


def unpermute_llama_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for ``num_heads`` heads (kv heads for k).

    HF keeps each head's rows as two halves ``[h, 2, d/2]`` (rotate-half rope); llama.cpp stores them
    interleaved ``[h, d/2, 2]``. Works on weights ``[rows, in]`` and biases ``[rows]``.
    """
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The HF config dict of a GGUF file (metadata only; no tensor data is read)."""
    return _config_from_reader(open_gguf(path), Path(path))


def read_gguf_chat_template(path: str | Path) -> str | None:
    """The ``tokenizer.chat_template`` metadata of a GGUF file, or None."""
    template: str | None = _scalar(open_gguf(path), "tokenizer.chat_template")
    return template


def load_gguf(path: str | Path) -> GGUFModel:
    """Read config, float32 state dict (HF names, llama q/k un-permuted) and chat template."""
    path = Path(path)
    reader = open_gguf(path)
    config = _config_from_reader(reader, path)
    shapes = expected_shapes(config)
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        try:
            name = hf_parameter_name(tensor.name)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc}: {path}") from None
        if name is None:
            continue
        weight = torch.from_numpy(_dequantize(tensor))
        if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
            weight = unpermute_llama_qk(weight, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
            weight = unpermute_llama_qk(weight, config["num_key_value_heads"])
        if name not in shapes or tuple(weight.shape) != shapes[name]:
            raise ModelLoadError(
                f"GGUF file {path}: tensor {tensor.name} -> {name} has shape {tuple(weight.shape)}, "
                f"config expects {shapes.get(name, 'no such parameter')}"
            )
        state_dict[name] = weight
    missing = sorted(set(shapes) - set(state_dict))
    if missing:
        raise ModelLoadError(f"GGUF file {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return GGUFModel(config, state_dict, _scalar(reader, "tokenizer.chat_template"))


def load_gguf_tokenizer(path: str | Path, chat_template: str | None = None) -> Any:
    """The HF tokenizer that transformers builds from the GGUF's vocabulary, with its chat template.

    ``chat_template`` saves re-reading the metadata when the caller already has it (``load_gguf``).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if chat_template is None:
        reader = open_gguf(path)
        _architecture(reader, path)
        chat_template = _scalar(reader, "tokenizer.chat_template")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot build a tokenizer from GGUF file {path}: {exc}") from exc
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer

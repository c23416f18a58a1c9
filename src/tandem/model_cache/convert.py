"""Convert a GGUF file once into an HF model directory (config, float32 safetensors, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (sorted keys: stable files)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def convert_gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to ``out_dir``.

    The safetensors hold exactly the dequantized float32 weights of ``load_gguf``; the tokenizer is
    the one transformers builds from the GGUF, saved with its chat template in tokenizer_config.json.
    Returns the config dict.
    """
    from safetensors.torch import save_file

    from tandem.model_cache.gguf_loader import load_gguf, load_gguf_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_gguf(gguf_path)
    tokenizer = load_gguf_tokenizer(gguf_path, chat_template=model.chat_template or "")
    # save_jinja_files=False keeps the template inside tokenizer_config.json (read by every client).
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)

    weights = out_dir / "model.safetensors"
    save_file(model.state_dict, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it 0600; cache files are world-readable like the rest
    write_json(out_dir / "config.json", model.config)
    write_json(out_dir / "generation_config.json", {k: model.config[k] for k in GENERATION_KEYS if k in model.config})
    return model.config

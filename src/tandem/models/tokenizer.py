"""Tokenizers (with their chat templates) of models, without loading weights or importing torch.

The frontend needs only this part of a model, so it lives apart from the weight loader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_hf_tokenizer(hf_dir: Path) -> Any:
    """The directory's tokenizer, or None when it ships none (test models that run on token ids)."""
    from transformers import AutoTokenizer

    if not any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        logger.warning("%s has no tokenizer files; the engine will accept token ids only", hf_dir)
        return None
    return AutoTokenizer.from_pretrained(str(hf_dir))


def load_tokenizer(name_or_path: str) -> Any:
    """Only the tokenizer (with its chat template) of a model name, HF directory or GGUF file.

    What a frontend needs: no weights are read. Returns None for a directory without tokenizer files.
    """
    from tandem.model_cache import resolve_model

    resolved = resolve_model(name_or_path, progress=False)
    if resolved.hf_dir is not None:
        return load_hf_tokenizer(resolved.hf_dir)
    from tandem.model_cache.gguf_loader import load_gguf_tokenizer

    assert resolved.gguf_path is not None  # a resolved model has an HF directory or a GGUF file
    return load_gguf_tokenizer(resolved.gguf_path)

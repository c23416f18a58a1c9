"""Fixtures the unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.tiny_models import make_tiny_model

from tandem.models.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random-weight Llama, loaded once per test module (engines built on it share it)."""
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    return load_model(str(path))

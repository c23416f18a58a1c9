"""load_model: clear errors for bad inputs; dtype and layout options."""

from __future__ import annotations

import json

import pytest
import torch
from tests.tiny_models import make_tiny_model

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.model_cache.errors import ModelLoadError
from tandem.models.loader import load_model
from tandem.protocols.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    make_tiny_model("qwen3", path)
    return path


def test_missing_path_names_known_models(tmp_path):
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        load_model(str(tmp_path / "nope"))


def test_unsupported_architecture_is_named(tmp_path, tiny_dir):
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not an HF model directory"):
        load_model(str(tmp_path))


def test_bad_dtype_and_unavailable_device(tiny_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tiny_dir), dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(str(tiny_dir), device="cuda")


def test_max_model_len_above_model_context_rejected(tiny_dir):
    with pytest.raises(ModelLoadError, match="exceeds"):
        load_model(str(tiny_dir), max_model_len=10_000)


def test_bfloat16_engine_agrees_with_float32(tiny_dir):
    prompt = list(range(5, 45))
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    tops = []
    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype=dtype, num_kv_blocks=16))
        assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
        engine.add_request("x", prompt, params)
        tops.append(engine.step()[0].logprobs[0].top_logprobs)
    assert tops[0][0][0] == tops[1][0][0]  # same argmax
    for (_, a), (_, b) in zip(tops[0], tops[1]):
        assert a == pytest.approx(b, abs=0.1)

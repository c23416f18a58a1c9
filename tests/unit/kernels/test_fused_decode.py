"""The fused C decoder (kernels/decode_forward) against the per-op PyTorch path of the same
model and cache: hidden states after all layers and the K/V it writes, for every tiny
architecture (GQA, q/k norm, qkv bias), float32 and bfloat16, one to four rows (GEMV), and in
bfloat16 on a CPU with AMX, batches of 5 and 17 rows (AMX tile multiplies)."""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import ARCHITECTURES, make_tiny_model

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.kernels import amx_linear, decode_forward
from tandem.models.llama import FUSED_DECODE_MAX_ROWS
from tandem.protocols.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, path)
    return path


def decode_step_inputs(engine: LLMEngine, rows: int):
    """Prefill ``rows`` requests, then the model inputs of their next (decode) step."""
    for i in range(rows):
        engine.add_request(
            f"r{i}",
            [(7 * i + j) % 250 + 3 for j in range(9 + 6 * i)],
            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        )
    engine.step()  # prefill (and first token)
    sched = engine.scheduler.schedule()
    return engine.runner.prepare_inputs(sched.chunks)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 17])
def test_fused_decoder_matches_the_per_op_path(tiny_path, dtype, rows):
    if rows > FUSED_DECODE_MAX_ROWS and not (dtype == "bfloat16" and amx_linear.available()):
        pytest.skip("batches above the GEMV rows run fused only in bfloat16 with AMX")
    engine = LLMEngine(EngineConfig(model=str(tiny_path), dtype=dtype, num_kv_blocks=512, block_size=4))
    model, runner = engine.loaded.model, engine.runner
    inputs = decode_step_inputs(engine, rows)
    assert inputs.meta.num_decode_tokens == rows and not inputs.meta.prefills
    if not decode_forward.supported(model, runner.kv_caches, runner.block_size):
        pytest.skip("no C compiler for the fused decoder")
    cache_before = runner.kv_cache.clone()
    with torch.inference_mode():
        model._fused_off = True
        want = model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta).float()
        want_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(cache_before)
        model._fused_off = False
        got = model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta).float()
    assert model._fused_decoder(runner.kv_caches, inputs.meta) is not None  # the fused path took this step
    assert model._fused.uses_amx == (dtype == "bfloat16" and amx_linear.available())
    tol = 1e-4 if dtype == "float32" else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    slots = inputs.meta.slot_mapping
    for layer in range(model.config.num_hidden_layers):  # the step's K and V rows in every layer
        torch.testing.assert_close(
            runner.kv_cache[layer, :, slots].float(), want_cache[layer, :, slots].float(), atol=tol, rtol=tol
        )


def test_larger_float32_batches_use_the_per_op_path(tiny_path):
    engine = LLMEngine(EngineConfig(model=str(tiny_path), dtype="float32", num_kv_blocks=64, block_size=4))
    inputs = decode_step_inputs(engine, FUSED_DECODE_MAX_ROWS + 1)
    model = engine.loaded.model
    assert model._fused_decoder(engine.runner.kv_caches, inputs.meta) is None

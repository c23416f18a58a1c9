"""Greedy parity with HF transformers on tiny random-weight models of every supported shape."""

from __future__ import annotations

import random

import pytest
import torch
from tests.tiny_models import ARCHITECTURES, make_tiny_model

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.kernels import decode_forward
from tandem.models.layers.linear import Linear
from tandem.protocols.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop, never mask EOS
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def prompts(seed: int, lengths=(5, 17, 33, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(request.param, path)
    return request.param, path, hf


def test_greedy_matches_hf_batched_and_cached(tiny):
    kind, path, hf = tiny
    engine = LLMEngine(
        EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=32)
    )
    ps = prompts(1)
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in ps]
    assert engine.generate(ps, GREEDY) == expected, kind  # batched, chunked (budget 32)
    again = engine.generate(ps, GREEDY)  # served from the prefix cache
    assert again == expected
    assert engine.stats().cached_prompt_tokens_total > 0


def test_logits_match_hf_prefill(tiny):
    kind, path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4))
    prompt = prompts(2, lengths=(30,))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    engine.add_request("x", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    out = engine.step()[0]
    ref_logprobs = torch.log_softmax(ref, -1)
    top = torch.topk(ref_logprobs, 5)
    assert [t for t, _ in out.logprobs[0].top_logprobs] == top.indices.tolist()
    for (_, lp), ref_lp in zip(out.logprobs[0].top_logprobs, top.values.tolist()):
        assert lp == pytest.approx(ref_lp, abs=1e-4)


def test_preemption_keeps_greedy_output(tmp_path):
    hf = make_tiny_model("llama", tmp_path)
    ps = prompts(3, lengths=(20, 21, 22, 23))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [hf_greedy(hf, p, 24) for p in ps]
    # 4 requests x 47 tokens need 48 blocks of 4; 26 blocks force preemption.
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=26, block_size=4))
    assert engine.generate(ps, params) == expected
    assert engine.stats().num_preemptions > 0


def test_single_stream_greedy_matches_hf_on_the_fused_decoder(tiny):
    """One request decodes one row per step: the fused C decoder on CPU (kernels/decode_forward)."""
    kind, path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4))
    model = engine.loaded.model
    if not decode_forward.supported(model, engine.runner.kv_caches, engine.runner.block_size):
        pytest.skip("no C compiler for the fused decoder")
    for prompt in prompts(3, lengths=(7, 21)):
        assert engine.generate([prompt], GREEDY) == [hf_greedy(hf, prompt, GREEDY.max_tokens)], kind
    assert model._fused is not None  # the steps above ran on it


def use_portable_path(engine: LLMEngine) -> None:
    """Turn off every C path of this engine: what runs on CUDA (PyTorch ops, gather + SDPA
    decode attention, no fused decoder), exercised here on the CPU."""
    model = engine.loaded.model
    model._fused_off = True
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = False
        if isinstance(module, Linear) and module.weight is not None:
            module.gemv, module.packed_weight = None, None  # plain F.linear, as on CUDA
    engine.runner.decode_kernel = False


def test_portable_path_matches_hf(tiny):
    kind, path, hf = tiny
    engine = LLMEngine(
        EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=32)
    )
    use_portable_path(engine)
    ps = prompts(4)
    assert engine.generate(ps, GREEDY) == [hf_greedy(hf, p, GREEDY.max_tokens) for p in ps], kind
    assert engine.generate([ps[0]], GREEDY) == [hf_greedy(hf, ps[0], GREEDY.max_tokens)], kind
    assert engine.loaded.model._fused is None

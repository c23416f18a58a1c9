"""Greedy token-for-token parity of the engine with HF transformers on the real SmolLM2-135M-Instruct;
and the README's engine example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.model_cache import DEFAULT_MODEL, resolve_model
from tandem.models.loader import load_model
from tandem.protocols.sampling_params import SamplingParams

NEW_TOKENS = 48
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "Name three fruits that are red, and one that is yellow.",
    "Translate 'good morning' into Spanish, French and German, and say which language is hardest to learn "
    "for an English speaker, giving one reason.",
    "hi",
]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def prompts(loaded):
    tok = loaded.tokenizer
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def expected(prompts):
    """HF transformers' greedy tokens for each prompt, one request at a time."""
    from transformers import AutoModelForCausalLM

    hf_dir = resolve_model(DEFAULT_MODEL).hf_dir
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: always NEW_TOKENS tokens
    out = []
    with torch.no_grad():
        for p in prompts:
            gen = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p) :].tolist())
    return out


def make_engine(loaded, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**{"num_kv_blocks": 256, **overrides}), loaded=loaded)


def test_one_at_a_time(loaded, prompts, expected):
    engine = make_engine(loaded)
    for p, exp in zip(prompts, expected):
        assert engine.generate([p], GREEDY)[0] == exp


def test_all_batched_then_from_prefix_cache(loaded, prompts, expected):
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths in one batch
    engine = make_engine(loaded, max_num_batched_tokens=64)  # also forces chunked prefill
    assert engine.generate(prompts, GREEDY) == expected
    cached_before = engine.stats().cached_prompt_tokens_total
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.stats().cached_prompt_tokens_total - cached_before >= 16 * len(prompts)


def test_small_pool_forces_preemption(loaded, prompts, expected):
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    engine = make_engine(loaded, num_kv_blocks=longest // 16 + 8, enable_prefix_caching=False)
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.stats().num_preemptions > 0


def test_gguf_and_safetensors_logits_agree(loaded, prompts):
    resolved = resolve_model(DEFAULT_MODEL)
    from_gguf = load_model(str(resolved.gguf_path))
    prompt = prompts[1]
    logits = []
    for lm in (loaded, from_gguf):
        engine = make_engine(lm)
        engine.add_request("x", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
        logits.append(engine.step()[0].logprobs[0].top_logprobs)
    assert [t for t, _ in logits[0]] == [t for t, _ in logits[1]]
    for (_, a), (_, b) in zip(*logits):
        assert a == pytest.approx(b, abs=1e-5)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    """The ```python block right after ``<!-- readme-example: NAME ... -->`` in the README."""
    match = re.search(rf"<!-- readme-example: {name}\b.*?-->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"no readme-example {name!r} in {README}"
    return match.group(1)


def test_readme_engine_example_runs():
    result = subprocess.run(
        [sys.executable, "-c", readme_example("engine")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "<|im_end|>" not in result.stdout, result.stdout

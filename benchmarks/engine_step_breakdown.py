"""Where the offline-throughput workload's time goes, for Tandem and for HF transformers.

Prints, for the 64 × 256-in / 128-out workload of engine_throughput.py:
- HF: prefill of one static batch (16 × 256 tokens) and one decode step at batch 16;
- Tandem: prefill of all 64 prompts, one decode step at batch 64, and that step split into
  linear layers, decode attention (block gather + SDPA) and the rest (torch profiler, CPU time).

Usage: python benchmarks/engine_step_breakdown.py [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import profile

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.model_cache import DEFAULT_MODEL, resolve_model
from tandem.protocols.sampling_params import SamplingParams

# Profiler op names (self CPU time) that belong to each part of a step, matched by substring.
LINEAR_OPS = ("_linear_pointwise", "aten::mm", "aten::addmm")
ATTENTION_OPS = ("scaled_dot_product", "aten::index_select")


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


def hf_figures(dtype: torch.dtype) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL).hf_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    batch = torch.tensor(prompts(16, 256))
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(batch))
    with torch.inference_mode():
        model.generate(batch[:, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        model.generate(batch, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(batch, max_new_tokens=33, **kwargs)
        total = time.perf_counter() - start
    return {"hf_prefill_16x256_s": prefill, "hf_decode_step_b16_ms": 1000 * (total - prefill) / 32}


def tandem_figures(dtype: str) -> dict[str, float]:
    engine = LLMEngine(EngineConfig(model=DEFAULT_MODEL, dtype=dtype, kv_cache_memory_gib=2.0, max_num_seqs=64))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(64, 256)):
        engine.add_request(str(i), prompt, params)
    start = time.perf_counter()
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    prefill = time.perf_counter() - start
    for _ in range(3):
        engine.step()  # settle
    steps = 10
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    with profile() as prof:
        for _ in range(steps):
            engine.step()
    by_op = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    total = sum(by_op.values())
    linear = sum(ms for op, ms in by_op.items() if any(k in op for k in LINEAR_OPS))
    attention = sum(ms for op, ms in by_op.items() if any(k in op for k in ATTENTION_OPS))
    others = sorted(
        ((ms, op) for op, ms in by_op.items() if not any(k in op for k in LINEAR_OPS + ATTENTION_OPS)), reverse=True
    )[:4]
    print("largest other ops (ms/step):", ", ".join(f"{op} {ms:.1f}" for ms, op in others))
    return {
        "tandem_prefill_64x256_s": prefill,
        "tandem_decode_step_b64_ms": step_ms,
        "profiled_step_ms": total,
        "linear_ms": linear,
        "attention_ms": attention,
        "other_ms": total - linear - attention,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    figures = {**tandem_figures(args.dtype), **hf_figures(getattr(torch, args.dtype))}
    for name, value in figures.items():
        print(f"{name:28s} {value:10.2f}")


if __name__ == "__main__":
    main()

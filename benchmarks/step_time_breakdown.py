"""Wall-clock breakdown of the builtin engine's steps: where a decode step and a prefill step go.

For each scenario (single-stream decode, decode at batch 64, a 2,048-token prefill step of
8 × 256-token prompts) the engine steps a few times with timers wrapped around its parts:

* **schedule + bookkeeping**: ``step()`` minus the runner (scheduler, outputs, stop checks);
* **inputs**: building the step's tensors (``ModelRunner.prepare_inputs``);
* **linear**: every ``Linear`` (oneDNN / C GEMV), LM head included;
* **attention**: ``paged_attention`` (KV write + the C kernel or gather + SDPA);
* **other model ops**: the rest of the forward (embedding, norms, RoPE, SiLU, residual adds);
* **sampler**.

The timers are Python perf_counter pairs (a few µs each, ~250 per step), so the total is a
little above an untimed step, which is printed beside it. A matmul of the same shapes as the
model's linear layers, outside the engine, gives the GEMM rate the linear part could reach.

Usage: python benchmarks/step_time_breakdown.py [--dtype auto] [--steps 10]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import tandem.models.layers.attention as attention_mod
import tandem.models.llama as llama_mod
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.model_runner import ModelRunner
from tandem.models.layers.linear import Linear
from tandem.protocols.sampling_params import SamplingParams

TIMES: dict[str, float] = defaultdict(float)
ENABLED = [False]


@contextmanager
def timed(name: str):
    if not ENABLED[0]:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] += time.perf_counter() - start


def wrap(owner, attr: str, name: str) -> None:
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        with timed(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def instrument(engine: LLMEngine) -> None:
    wrap(Linear, "forward", "linear")
    wrap(ModelRunner, "prepare_inputs", "inputs")
    wrap(engine.runner.sampler.__class__, "__call__", "sampler")
    wrap(engine.runner.model.__class__, "forward", "forward")
    wrap(engine.runner.model.__class__, "compute_logits", "forward")  # the LM head: its Linear counts as linear
    wrap(engine.runner.__class__, "execute", "runner")
    llama_mod.paged_attention = _timed_attention


_attention = attention_mod.paged_attention


def _timed_attention(*args, **kwargs):
    with timed("attention"):
        return _attention(*args, **kwargs)


def breakdown(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Mean ms per part over ``steps`` timed steps (the engine must have work for them)."""
    TIMES.clear()
    ENABLED[0] = True
    try:
        start = time.perf_counter()
        for _ in range(steps):
            with timed("step"):
                engine.step()
        total = time.perf_counter() - start
    finally:
        ENABLED[0] = False
    ms = {k: v / steps * 1000 for k, v in TIMES.items()}
    return {
        "step (timed)": total / steps * 1000,
        "schedule + bookkeeping": ms["step"] - ms.get("runner", 0),
        "inputs": ms.get("inputs", 0),
        "linear": ms.get("linear", 0),
        "attention": ms.get("attention", 0),
        "other model ops": ms.get("forward", 0) - ms.get("linear", 0) - ms.get("attention", 0),
        "sampler": ms.get("sampler", 0),
    }


def untimed_step_ms(engine: LLMEngine, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps * 1000


def add(engine: LLMEngine, n: int, prompt_len: int, max_tokens: int, tag: str) -> None:
    rng = random.Random(len(tag))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"{tag}{i}", [rng.randrange(100, 40000) for _ in range(prompt_len)], params)


def gemm_rate(engine: LLMEngine, rows: int) -> float:
    """TFLOP/s of plain torch matmuls with the model's linear shapes at ``rows`` rows."""
    dtype = engine.loaded.dtype
    shapes = [(m.in_features, m.out_features) for m in engine.runner.model.modules() if isinstance(m, Linear)]
    weights = [torch.randn(o, i, dtype=dtype) for i, o in shapes]
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in shapes}
    for (i, _), w in zip(shapes, weights):
        torch.matmul(xs[i], w.t())
    start = time.perf_counter()
    for (i, _), w in zip(shapes, weights):
        torch.matmul(xs[i], w.t())
    elapsed = time.perf_counter() - start
    flops = sum(2 * rows * i * o for i, o in shapes)
    return flops / elapsed / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(dtype=args.dtype, kv_cache_memory_gib=1.0))
    instrument(engine)
    print(f"dtype {engine.loaded.dtype}, {torch.get_num_threads()} threads")
    linear_flops = sum(
        2 * m.in_features * m.out_features for m in engine.runner.model.modules() if isinstance(m, Linear)
    )

    def report(title: str, parts: dict[str, float], untimed: float, rows: int) -> None:
        print(f"\n{title}: untimed step {untimed:.1f} ms")
        for name, value in parts.items():
            print(f"  {name:24s} {value:8.2f} ms")
        rate = rows * linear_flops / (parts["linear"] / 1000) / 1e12
        print(
            f"  linear layers at {rate:.2f} TFLOP/s; torch.matmul of the same shapes: "
            f"{gemm_rate(engine, rows):.2f} TFLOP/s"
        )

    add(engine, 1, 256, 10_000, "single")
    for _ in range(5):
        engine.step()
    report("single-stream decode (context ~260)", breakdown(engine, args.steps), untimed_step_ms(engine, args.steps), 1)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)

    add(engine, 64, 256, 10_000, "batch")
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    report("decode at batch 64 (context ~260)", breakdown(engine, args.steps), untimed_step_ms(engine, args.steps), 64)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)

    steps = 3
    add(engine, 8 * (steps + 2), 256, 1, "prefill")
    engine.step()  # warm-up of the 2,048-token shapes
    report("prefill step, 8 x 256 new tokens", breakdown(engine, steps), untimed_step_ms(engine, 1), 2048)


if __name__ == "__main__":
    main()

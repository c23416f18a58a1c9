"""Does ``torch.compile`` of the decode step pay on CPU? Decode-step time at batch 64 three ways.

* **eager PyTorch**: the builtin engine with every Tandem C kernel switched off (gather + SDPA
  attention, PyTorch norms/RoPE/SiLU, oneDNN linears): the graph torch.compile can see whole;
* **torch.compile**: the same model with ``model.forward`` compiled by inductor (``dynamic=True``,
  so growing contexts do not recompile), timed after warm-up steps; its linears are plain
  ``F.linear`` (inductor cannot lower the opaque oneDNN-packed weight with dynamic shapes);
* **Tandem kernels**: the engine's default CPU path (C paged attention, fused elementwise, AMX).

Each runs in its own process (the kernel switches are environment variables read at load), on
the same 64 random 256-token prompts, bf16; the figure is the median step time over 20 decode
steps after 5 warm-up steps. Compile time is printed too.

Usage: python benchmarks/torch_compile_decode.py
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time

KERNEL_SWITCHES = (
    "TANDEM_DISABLE_CPU_ATTENTION",
    "TANDEM_DISABLE_FUSED_DECODE",
    "TANDEM_DISABLE_CPU_ELEMENTWISE",
    "TANDEM_DISABLE_CPU_GEMV",
    "TANDEM_DISABLE_CPU_AMX_LINEAR",
    "TANDEM_DISABLE_CPU_PREFILL_ATTENTION",
)


def child(mode: str) -> dict:
    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.protocols.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_memory_gib=1.0))
    compile_s = 0.0
    if mode == "compile":
        from tandem.models.layers.linear import Linear

        model = engine.runner.model
        for module in model.modules():
            if isinstance(module, Linear):
                module.packed_weight, module.gemv = None, None
        model.forward = torch.compile(model.forward, dynamic=True)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i in range(64):
        engine.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(256)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    start = time.perf_counter()
    engine.step()  # first decode step: compiles in "compile" mode
    compile_s = time.perf_counter() - start
    for _ in range(4):
        engine.step()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return {"step_ms": statistics.median(times) * 1000, "first_step_s": compile_s}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2])), flush=True)
        return
    results = {}
    for mode in ("eager", "compile", "kernels"):
        env = dict(os.environ)
        if mode != "kernels":
            # The plain-weight GEMV library stays loadable so Linear keeps its plain weight; the
            # compiled run drops both kernels' bindings itself.
            env.update({name: "1" for name in KERNEL_SWITCHES if name != "TANDEM_DISABLE_CPU_GEMV"})
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode], env=env, capture_output=True, text=True, timeout=3600
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1][7:])
        print(
            f"{mode:8s}: decode step at batch 64 {results[mode]['step_ms']:.1f} ms "
            f"(first decode step {results[mode]['first_step_s']:.1f} s)",
            flush=True,
        )
    e, c, k = (results[m]["step_ms"] for m in ("eager", "compile", "kernels"))
    print(f"torch.compile vs eager PyTorch: {e / c:.2f}x; Tandem kernels vs torch.compile: {c / k:.2f}x")


if __name__ == "__main__":
    main()

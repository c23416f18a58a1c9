"""What the offload policy costs when nothing needs offloading: the same prompts through one
builtin engine whose KV pool holds them all, with no tiers, with a host tier under the `evict`
policy (nothing is evicted, so nothing is copied) and under `write-through` (every computed
block is copied to host memory at the end of its step).

Printed: wall time of each run (median of ``--repeats``, interleaved), the blocks copied, and
each run's time ÷ the no-tier run's.

Usage: python benchmarks/kv_offload_policy.py [--prompts 16] [--prompt-len 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tandem.engine.config import EngineConfig
from tandem.engine.kv_tiers.config import KvTierConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.models.loader import load_model
from tandem.protocols.sampling_params import SamplingParams

CONFIGS = {
    "no tiers": KvTierConfig(),
    "G2, evict": KvTierConfig(host_cache_gib=1.0),
    "G2, write-through": KvTierConfig(host_cache_gib=1.0, offload_policy="write-through"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m-instruct")
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    copied: dict[str, int] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, tiers in CONFIGS.items():
            engine = LLMEngine(EngineConfig(num_kv_blocks=2048, max_num_seqs=8, kv_tiers=tiers), loaded=loaded)
            start = time.perf_counter()
            outputs[name] = engine.generate(prompts, params)
            times[name].append(time.perf_counter() - start)
            stats = engine.stats().tiers
            copied[name] = stats.offloaded_g1_g2 if stats is not None else 0
            engine.close()
    assert all(out == outputs["no tiers"] for out in outputs.values()), "outputs differ"
    base = statistics.median(times["no tiers"])
    print(f"{args.prompts} prompts × {args.prompt_len} tokens, {args.max_tokens} out, 8 at a time; pool holds all")
    for name in CONFIGS:
        t = statistics.median(times[name])
        trials = ", ".join(f"{x:.2f}" for x in times[name])
        print(f"{name:18} | {t:6.2f} s | {copied[name]:5} blocks copied | {t / base:.3f}x | trials {trials}")


if __name__ == "__main__":
    main()

"""Served ITL at concurrency 1 beside the engine's own offline decode time per token, same run.

Both sides decode the same greedy request (a fixed random-token prompt, ``ignore_eos``):

* **offline**: a child process builds the engine on its main thread and steps it alone; the
  time per token is the decode part (first token to last) ÷ (tokens − 1);
* **served**: ``tandem serve`` (one worker, the same engine flags); the official ``openai``
  client streams the same request from ``/v1/completions`` (token-id prompt); ITL = the gaps
  between streamed chunks after the first.

The two never run at once (this machine has 2 cores); ``--rounds`` alternates them and prints
each round and the medians, and the ratio served ITL p50 ÷ offline ms/token (goal ≤ 1.10).

Usage: python benchmarks/served_vs_offline_itl.py [--dtype bfloat16] [--prompt-len 512]
       [--max-tokens 128] [--rounds 3] [--requests 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_util import serving

OFFLINE = r"""
import json, sys, time
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
cfg = json.loads(sys.argv[1])
engine = LLMEngine(EngineConfig(dtype=cfg["dtype"], num_threads=cfg["threads"], kv_cache_memory_gib=0.5))
params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True)
engine.generate([cfg["prompt"][:32]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
per_token = []
for i in range(cfg["requests"]):
    engine.add_request(f"r{i}", cfg["prompt"], params)
    stamps = []
    while engine.has_unfinished_requests:
        if engine.step():
            stamps.append(time.perf_counter())
    per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)
print(json.dumps(per_token))
"""


def offline_ms_per_token(cfg: dict) -> list[float]:
    out = subprocess.run([sys.executable, "-c", OFFLINE, json.dumps(cfg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def served_itls(cfg: dict) -> list[list[float]]:
    from openai import OpenAI

    args = ["--dtype", cfg["dtype"], "--kv-cache-gib", "0.5", "--port", "0"]
    if cfg["threads"]:
        args += ["--threads", str(cfg["threads"])]
    per_request = []
    with serving(*args) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt=cfg["prompt"][:32], max_tokens=4)  # warm-up
        for _ in range(cfg["requests"]):
            stamps = []
            stream = client.completions.create(
                model=model,
                prompt=cfg["prompt"],
                max_tokens=cfg["max_tokens"],
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
            per_request.append([(b - a) * 1000 for a, b in zip(stamps, stamps[1:])])
    return per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3, help="requests per side per round")
    args = parser.parse_args()
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49000) for _ in range(args.prompt_len)]
    cfg = {
        "dtype": args.dtype,
        "threads": args.threads,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "requests": args.requests,
    }
    offline_rounds, served_p50s, served_means = [], [], []
    for r in range(args.rounds):
        offline = statistics.median(offline_ms_per_token(cfg))
        itls = served_itls(cfg)
        flat = [x for request in itls for x in request]
        p50, mean = statistics.median(flat), statistics.fmean(flat)
        p99 = sorted(flat)[int(0.99 * (len(flat) - 1))]
        offline_rounds.append(offline)
        served_p50s.append(p50)
        served_means.append(mean)
        print(
            f"round {r + 1}: offline {offline:.2f} ms/token | served ITL p50 {p50:.2f} mean {mean:.2f} "
            f"p99 {p99:.2f} ms | p50 ÷ offline {p50 / offline:.3f}",
            flush=True,
        )
    off, p50, mean = (statistics.median(x) for x in (offline_rounds, served_p50s, served_means))
    print(
        f"median of {args.rounds} rounds ({args.dtype}, prompt {args.prompt_len}, {args.max_tokens} tokens): "
        f"offline {off:.2f} ms/token, served ITL p50 {p50:.2f} ms (mean {mean:.2f}); "
        f"served p50 ÷ offline = {p50 / off:.3f} (goal ≤ 1.10)"
    )


if __name__ == "__main__":
    main()

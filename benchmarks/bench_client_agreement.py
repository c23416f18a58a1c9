"""Does `tandem bench` measure what an independent client measures?

One `tandem serve` with a fixed-delay mocker worker (prefill 50 ms, decode 10 ms per step), the
same requests (random token-id prompts, `ignore_eos`, streamed completions) sent two ways at the
same concurrency:

* `tandem bench run` (aiohttp, its own SSE reader);
* **baseline**: a short script on the official `openai` client (`AsyncOpenAI`, streaming), TTFT
  taken at the first chunk with text.

Prints both TTFT p50s and their ratio (goal: within 10%), and the same for mean inter-chunk
latency.

Usage: python benchmarks/bench_client_agreement.py [--concurrency 4] [--num-requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tandem.bench.workload_random import RandomWorkloadConfig, random_requests

MODEL = "smollm2-135m-instruct"
GRAPH = """
frontend: {port: 0}
workers:
  - engine: mocker
    flags: {speedup-ratio: 1, mocker-prefill-coeffs: [0, 0, 50], mocker-decode-coeffs: [0, 0, 10]}
"""


async def openai_run(url: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
    config = RandomWorkloadConfig(input_len=args.input_len, output_len=args.output_len,
                                  num_requests=args.num_requests, seed=args.seed)
    queue = list(reversed(random_requests(config)))
    ttfts: list[float] = []
    gaps: list[float] = []

    async def user() -> None:
        while queue:
            request = queue.pop()
            start = time.perf_counter()
            stream = await client.completions.create(model=MODEL, prompt=request.prompt, max_tokens=request.max_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            last = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    now = time.perf_counter()
                    if last is None:
                        ttfts.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now

    await asyncio.gather(*(user() for _ in range(args.concurrency)))
    await client.close()
    return ttfts, gaps


def tandem_bench_run(url: str, out: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    subprocess.run([sys.executable, "-m", "tandem", "bench", "run", "--url", url, "--model", MODEL,
                    "--workload", "random", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency),
                    "--seed", str(args.seed), "--no-progress", "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line]
    return [r["ttft_s"] for r in records if r["ok"]], [g for r in records if r["ok"] for g in r.get("itl_s", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-agree-"))
    graph = tmp / "graph.yaml"
    graph.write_text(GRAPH)
    serve = subprocess.Popen([sys.executable, "-m", "tandem", "serve", str(graph)], stdout=subprocess.PIPE, text=True)
    try:
        for line in serve.stdout:
            if line.startswith("Tandem is serving"):
                url = line.split(" at ")[1].split("/v1")[0]
                break
        results = {}
        # Alternate the two clients so drift in the machine's speed hits both alike.
        for round_index in range(2):
            results.setdefault("tandem bench", ([], []))
            results.setdefault("openai client", ([], []))
            t, g = tandem_bench_run(url, tmp / f"run{round_index}", args)
            results["tandem bench"][0].extend(t), results["tandem bench"][1].extend(g)
            t, g = asyncio.run(openai_run(url, args))
            results["openai client"][0].extend(t), results["openai client"][1].extend(g)
    finally:
        serve.send_signal(2)
        serve.wait(timeout=60)
    print(f"fixed-delay mocker (prefill 50 ms, decode 10 ms), concurrency {args.concurrency}, "
          f"2 × {args.num_requests} requests per client")
    p50 = {}
    for name, (ttfts, gaps) in results.items():
        p50[name] = statistics.median(ttfts) * 1e3
        print(f"{name:14} TTFT p50 {p50[name]:7.2f} ms, mean {statistics.fmean(ttfts) * 1e3:7.2f} ms; "
              f"inter-chunk mean {statistics.fmean(gaps) * 1e3:6.2f} ms (n={len(ttfts)})")
    ratio = p50["tandem bench"] / p50["openai client"]
    print(f"TTFT p50 ratio tandem bench / openai client: {ratio:.3f} ({abs(ratio - 1) * 100:.1f}% apart; goal < 10%)")


if __name__ == "__main__":
    main()

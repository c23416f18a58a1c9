"""Does `tandem bench` measure what an independent client measures?

One `tandem serve` with a fixed-delay mocker worker (prefill 50 ms, decode 10 ms per step), the
same requests (random token-id prompts, `ignore_eos`, streamed completions) sent two ways at the
same concurrency:

* `tandem bench run` (aiohttp, its own SSE reader);
* **baseline**: a short script on the official `openai` client (`AsyncOpenAI`, streaming), TTFT
  taken at the first chunk with text, once with the client's chunk objects ("openai client")
  and once with its raw streaming response ("openai raw": the same HTTP stack without a
  pydantic model per chunk).

Prints both TTFT p50s and their ratio (goal: within 10%), the mean inter-chunk latency, and as
a referee the server's own mean TTFT over each client's requests (the frontend's
``tandem_frontend_time_to_first_token_seconds``: HTTP arrival → first token from the worker), so
the difference between a client's TTFT and the server's is that client's own overhead.

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

from serve_util import serving
from tandem.bench.workloads.random_tokens import RandomWorkloadConfig, random_requests

MODEL = "smollm2-135m-instruct"
GRAPH = """
frontend: {port: 0}
workers:
  - engine: mocker
    flags: {speedup-ratio: 1, mocker-prefill-coeffs: [0, 0, 50], mocker-decode-coeffs: [0, 0, 10]}
"""


async def openai_run(url: str, args: argparse.Namespace, raw: bool) -> tuple[list[float], list[float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
    config = RandomWorkloadConfig(
        input_len=args.input_len, output_len=args.output_len, num_requests=args.num_requests, seed=args.seed
    )
    queue = list(reversed(random_requests(config)))
    ttfts: list[float] = []
    gaps: list[float] = []

    async def user() -> None:
        while queue:
            request = queue.pop()
            kwargs = dict(
                model=MODEL,
                prompt=request.prompt,
                max_tokens=request.max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            start = time.perf_counter()
            last = None
            if raw:  # the client's raw streaming response: its HTTP stack without per-chunk models
                async with client.completions.with_streaming_response.create(**kwargs) as response:
                    async for line in response.iter_lines():
                        if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                            now = time.perf_counter()
                            (ttfts if last is None else gaps).append(now - (start if last is None else last))
                            last = now
                continue
            stream = await client.completions.create(**kwargs)
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
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem",
            "bench",
            "run",
            "--url",
            url,
            "--model",
            MODEL,
            "--workload",
            "random",
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--num-requests",
            str(args.num_requests),
            "--concurrency",
            str(args.concurrency),
            "--seed",
            str(args.seed),
            "--no-progress",
            "--output",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line]
    return [r["ttft_s"] for r in records if r["ok"]], [g for r in records if r["ok"] for g in r.get("itl_s", [])]


def server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the frontend's TTFT histogram."""
    import re
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    total = re.search(r"tandem_frontend_time_to_first_token_seconds_sum\S* (\S+)", text)
    count = re.search(r"tandem_frontend_time_to_first_token_seconds_count\S* (\S+)", text)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


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
    with serving(str(graph)) as url:
        results: dict[str, tuple[list[float], list[float]]] = {
            "tandem bench": ([], []),
            "openai client": ([], []),
            "openai raw": ([], []),
        }
        server = {name: [0.0, 0.0] for name in results}
        # Alternate the two clients so drift in the machine's speed hits both alike.
        for round_index in range(2):
            for name in results:
                before = server_ttft(url)
                if name == "tandem bench":
                    t, g = tandem_bench_run(url, tmp / f"run{round_index}", args)
                else:
                    t, g = asyncio.run(openai_run(url, args, raw=name == "openai raw"))
                after = server_ttft(url)
                results[name][0].extend(t), results[name][1].extend(g)
                server[name][0] += after[0] - before[0]
                server[name][1] += after[1] - before[1]
    print(
        f"fixed-delay mocker (prefill 50 ms, decode 10 ms), concurrency {args.concurrency}, "
        f"2 × {args.num_requests} requests per client"
    )
    p50 = {}
    for name, (ttfts, gaps) in results.items():
        p50[name] = statistics.median(ttfts) * 1e3
        print(
            f"{name:14} TTFT p50 {p50[name]:7.2f} ms, mean {statistics.fmean(ttfts) * 1e3:7.2f} ms; "
            f"inter-chunk mean {statistics.fmean(gaps) * 1e3:6.2f} ms (n={len(ttfts)}); "
            f"server-side TTFT mean over its requests {server[name][0] / max(server[name][1], 1) * 1e3:7.2f} ms"
        )
    for other in ("openai client", "openai raw"):
        ratio = p50["tandem bench"] / p50[other]
        print(f"TTFT p50 ratio tandem bench / {other}: {ratio:.3f} ({abs(ratio - 1) * 100:.1f}% apart; goal < 10%)")


if __name__ == "__main__":
    main()

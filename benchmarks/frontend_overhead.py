"""Frontend + request-plane overhead: what the HTTP frontend adds on top of a zero-delay engine.

Setup (all on 127.0.0.1): one `tandem worker --engine mocker --speedup-ratio 0` process (its
steps cost only the scheduler's bookkeeping) and one `tandem frontend` process in front of it.
Workload: completions with a 1000-token text prompt (unique per request) and 100 output tokens
(``ignore_eos``), streamed, at concurrency 1, 8 and 64.

* **Frontend**: this process sends the requests over HTTP and reads the SSE stream.
* **Baseline** (same run, same worker): this process streams the same token ids straight from
  the worker over the request plane, with no HTTP, tokenization, detokenization or SSE.

Reported per concurrency: requests/s, streamed tokens/s, TTFT p50 and ITL mean for both, and the
frontend's added TTFT (p50 difference) and added latency per streamed token.

The HTTP client here is a minimal raw-socket SSE reader (HTTP/1.1, chunked): httpx or the openai
client spend more CPU per event than the server under test, and on a 2-core machine the client
would become the bottleneck being measured.

Usage: python benchmarks/frontend_overhead.py [--concurrency 1 8 64] [--requests-per-client 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from tandem.runtime.request_plane import RequestPlaneClient

MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 1000
OUTPUT_TOKENS = 100


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "req_per_s": self.requests / self.seconds,
            "tok_per_s": self.tokens / self.seconds,
            "ttft_p50_ms": statistics.median(self.ttft) * 1e3,
            "itl_mean_ms": statistics.fmean(self.itl) * 1e3 if self.itl else 0.0,  # per token
        }


# --- a raw SSE client ------------------------------------------------------------------------


class SSEConnection:
    """One keep-alive HTTP/1.1 connection (as pooled OpenAI clients use) that streams SSE."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: dict) -> tuple[float, float, int]:
        """POST ``body``; return (TTFT, time from first to last content event, completion tokens)."""
        start = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, payload = self.reader, json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        first = last = None
        usage_tokens = 0
        pending = b""
        while True:  # chunked transfer: "<hex size>\r\n<data>\r\n", ends with a 0-size chunk
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            pending += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                now = time.perf_counter()
                if event == b"data: [DONE]":
                    continue
                if b'"usage":{' in event:
                    usage_tokens = int(re.search(rb'"completion_tokens":(\d+)', event).group(1))
                if b'"choices":[]' in event:
                    continue
                if first is None:
                    first = now
                last = now
        assert first is not None and last is not None
        return first - start, last - first, usage_tokens

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record(result: Result, ttft: float, decode_time: float, tokens: int) -> None:
    result.ttft.append(ttft)
    if tokens > 1:
        result.itl.append(decode_time / (tokens - 1))  # mean time per token after the first
    result.tokens += tokens
    result.requests += 1


async def run_frontend(port: int, prompts: list[str] | list[list[int]], concurrency: int) -> Result:
    result = Result()
    queue = list(prompts)

    async def client() -> None:
        conn = SSEConnection("127.0.0.1", port)
        while queue:
            prompt = queue.pop()
            _record(
                result,
                *await conn.request(
                    "/v1/completions",
                    {
                        "model": MODEL,
                        "prompt": prompt,
                        "max_tokens": OUTPUT_TOKENS,
                        "ignore_eos": True,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ),
            )
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def run_direct(address: str, prompts: list[list[int]], concurrency: int) -> Result:
    result = Result()
    queue = list(enumerate(prompts))
    rp = RequestPlaneClient()

    async def client() -> None:
        while queue:
            index, ids = queue.pop()
            start = time.perf_counter()
            first = last = None
            tokens = 0
            payload = {
                "request_id": f"direct-{concurrency}-{index}-{random.random()}",
                "token_ids": ids,
                "sampling": {"max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0.0},
            }
            async for delta in rp.stream(address, "generate", payload):
                last = time.perf_counter()
                first = first or last
                tokens += len(delta["token_ids"])
            _record(result, first - start, last - first, tokens)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    await rp.close()
    return result


# --- setup --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(tokenizer, count: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """Texts that tokenize to about PROMPT_TOKENS tokens, and their exact token ids."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 9000)) if w.isalpha()]
    texts, ids = [], []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(PROMPT_TOKENS))
        tokens = tokenizer.encode(text)[:PROMPT_TOKENS]
        text = tokenizer.decode(tokens)
        texts.append(text)
        ids.append(tokenizer.encode(text))
    return texts, ids


async def server_ttft(port: int) -> tuple[float, float]:
    """(sum, count) of the frontend's own TTFT histogram (arrival → first token from the worker)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    total = re.search(r"tandem_frontend_time_to_first_token_seconds_sum\S* (\S+)", text)
    count = re.search(r"tandem_frontend_time_to_first_token_seconds_count\S* (\S+)", text)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


async def wait_ready(port: int, timeout: float = 120.0) -> str:
    """The worker's request-plane address, once the frontend reports it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            body = json.loads(data.split(b"\r\n\r\n", 1)[1])
            workers = body["models"].get(MODEL) or []
            if workers:
                return workers[0]["address"]
        except (OSError, ValueError, KeyError, IndexError):
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("frontend not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--speedup-ratio",
        type=float,
        default=0.0,
        help="mocker speedup (0 = zero delay, the default; e.g. 10 for a machine that is not saturated)",
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=8, help="requests per concurrent client (at least 16 in all)"
    )
    args = parser.parse_args()

    from tandem.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    disco = tempfile.mkdtemp(prefix="tandem-bench-")
    port = free_port()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "worker",
            "--engine",
            "mocker",
            "--speedup-ratio",
            str(args.speedup_ratio),
            "--model",
            MODEL,
            "--discovery",
            f"file:{disco}",
            "--log-level",
            "WARNING",
            "--max-num-seqs",
            "256",
            "--max-num-batched-tokens",
            "8192",
        ],
        stdout=subprocess.DEVNULL,
    )
    frontend = subprocess.Popen(
        [sys.executable, "-m", "tandem", "frontend", "--discovery", f"file:{disco}", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [psutil.Process(p.pid) for p in (worker, frontend)]
    try:
        address = asyncio.run(wait_ready(port))
        # warm up: the frontend loads the tokenizer on its first request
        warm_texts, _ = make_prompts(tokenizer, 4, seed=0)
        asyncio.run(run_frontend(port, warm_texts, 2))
        print(
            f"worker {address} (mocker speedup {args.speedup_ratio}), frontend 127.0.0.1:{port}; "
            f"prompt {PROMPT_TOKENS} tokens, output {OUTPUT_TOKENS}"
        )
        header = (
            f"{'conc':>4} | {'path':<15} | {'req/s':>7} | {'tok/s':>8} | {'TTFT p50 ms':>11} | "
            f"{'ms/token':>8} | {'CPU fe / client':>15} | server-side TTFT mean"
        )
        print(header)
        print("-" * len(header))
        for seed, conc in enumerate(args.concurrency, start=1):
            n = max(16, conc * args.requests_per_client)
            texts, ids = make_prompts(tokenizer, n, seed=seed)
            rows = [("direct", asyncio.run(run_direct(address, ids, conc)).summary(), "")]
            for name, prompts in (("frontend (ids)", [i[:] for i in ids]), ("frontend (text)", texts)):
                cpu0, wall0, mine0 = procs[1].cpu_times(), time.perf_counter(), psutil.Process().cpu_times()
                ttft0 = asyncio.run(server_ttft(port))
                summary = asyncio.run(run_frontend(port, prompts, conc)).summary()
                ttft1 = asyncio.run(server_ttft(port))
                summary["server_ttft_ms"] = (ttft1[0] - ttft0[0]) / max(1.0, ttft1[1] - ttft0[1]) * 1e3
                cpu1, mine1, wall = procs[1].cpu_times(), psutil.Process().cpu_times(), time.perf_counter() - wall0
                share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
                client = (mine1.user + mine1.system - mine0.user - mine0.system) / wall
                rows.append((name, summary, f"{share * 100:.0f}% / {client * 100:.0f}%"))
            for name, s, cpu in rows:
                print(
                    f"{conc:>4} | {name:<15} | {s['req_per_s']:>7.1f} | {s['tok_per_s']:>8.0f} | "
                    f"{s['ttft_p50_ms']:>11.2f} | {s['itl_mean_ms']:>8.3f} | {cpu:>15} | "
                    + (f"{s['server_ttft_ms']:.2f} ms" if "server_ttft_ms" in s else "")
                )
            direct = rows[0][1]
            for name, s, _ in rows[1:]:
                print(
                    f"{conc:>4} | added by {name[9:]:<6} | TTFT {s['ttft_p50_ms'] - direct['ttft_p50_ms']:+.2f} ms, "
                    f"per token {s['itl_mean_ms'] - direct['itl_mean_ms']:+.3f} ms, "
                    f"throughput ratio frontend/direct {s['tok_per_s'] / direct['tok_per_s']:.2f}"
                )
    finally:
        for proc in (frontend, worker):
            proc.terminate()
        for proc in (frontend, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        os.system(f"rm -rf {disco}")


if __name__ == "__main__":
    main()

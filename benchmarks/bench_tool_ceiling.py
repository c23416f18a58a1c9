"""How much streamed load `tandem bench` can consume, and what it costs the machine.

1. **Against Tandem**: `tandem serve --engine mocker --speedup-ratio 0` (zero-delay engine behind
   the real frontend), `tandem bench run` at concurrency 64: streamed output tokens/s, SSE
   events/s and the tool's own CPU share.
2. **Baseline, same run, the tool's ceiling**: a bare asyncio server in a child process that
   streams pre-rendered completion chunks (one token per event) as fast as the socket takes
   them. Nothing on the server side is slower than the client, so the events/s `tandem bench`
   reaches there (at ~100% of its core) is what the tool can consume at most.

The ratio (Tandem run's events/s ÷ ceiling) says how close the Tandem measurement came to the
tool's own limit: well below 1 means the server, not the tool, set the pace.

Usage: python benchmarks/bench_tool_ceiling.py [--concurrency 64] [--num-requests 640] [--output-len 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_util import serving

MODEL = "smollm2-135m-instruct"

FIREHOSE = r"""
import asyncio, sys
N = int(sys.argv[1])
CHUNK = (b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
         b'"text":" tok","logprobs":null,"finish_reason":null}],"usage":null}\n\n')
USAGE = (b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[],'
         b'"usage":{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n') % (N, N + 8)

def chunked(data):
    return b"%x\r\n%s\r\n" % (len(data), data)

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(N):
                writer.write(chunked(CHUNK))
                if i % 16 == 15:
                    await writer.drain()
            writer.write(chunked(USAGE) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def bench(url: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
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
        "64",
        "--output-len",
        str(args.output_len),
        "--concurrency",
        str(args.concurrency),
        "--num-requests",
        str(args.num_requests),
        "--warmup-requests",
        "8",
        "--no-progress",
        "--output",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line]
    events = sum(len(r.get("itl_s", [])) + 1 for r in records if r["ok"])
    return {
        "tok_s": summary["output_token_throughput"],
        "events_s": events / summary["duration_s"],
        "cpu": summary["client_cpu_percent"],
        "ok": summary["requests_ok"],
        "sent": summary["requests_sent"],
        "ttft_p50": summary["ttft_ms"]["p50"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=640)
    parser.add_argument("--output-len", type=int, default=100)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-ceiling-"))

    with serving("--engine", "mocker", "--speedup-ratio", "0", "--port", "0", "--max-num-seqs", "256") as url:
        tandem = bench(url, tmp / "tandem", args)

    fire = subprocess.Popen(
        [sys.executable, "-c", FIREHOSE, str(args.output_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(fire.stdout.readline())
        ceiling = bench(f"http://127.0.0.1:{port}", tmp / "firehose", args)
    finally:
        fire.stdin.close()
        fire.wait(timeout=10)

    print(f"concurrency {args.concurrency}, {args.num_requests} requests × {args.output_len} output tokens")
    for name, r in (("tandem serve (zero-delay mocker)", tandem), ("firehose (tool ceiling)", ceiling)):
        print(
            f"{name:34} ok {r['ok']}/{r['sent']}: {r['tok_s']:>9,.0f} tok/s, {r['events_s']:>9,.0f} events/s, "
            f"TTFT p50 {r['ttft_p50']:.1f} ms, tool CPU {r['cpu']:.0f}% of a core"
        )
    print(f"ratio tandem/ceiling (events/s): {tandem['events_s'] / ceiling['events_s']:.2f}")
    os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main()

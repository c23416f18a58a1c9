"""Decode ITL under long-prompt interference on the real model: disagg (1 prefill + 1 decode
worker) against agg (2 workers).

Two deployments of the builtin engine (or, with ``--engine vllm``, of vLLM's CPU build: fp32,
eager mode, blocks of 32, KV moved by Tandem's vLLM KV connector) on the default model (SmolLM2-135M-Instruct, CPU), each
started fresh with `tandem serve`, in the same run and with the same engine flags (float32,
``--kv-cache-gib`` 0.5, ``--threads`` 1 per worker, so both get two single-threaded engines):

* **agg**: two ``agg`` workers behind the round-robin router;
* **disagg**: one ``prefill`` and one ``decode`` worker; prompts over ``max_local_prefill_length``
  (64) are prefilled on the prefill worker and their KV blocks pulled by the decode worker.

Method, per deployment: after a warm-up (two short and two 1,500-token requests), K **decode
streams** (default 4) each loop over streamed completions with a short prompt (48 tokens, below
64, so in disagg they run whole on the decode worker; in agg round-robin spreads them over both
workers) and ``max_tokens`` 256 with ``ignore_eos``; each request is re-issued when it ends, so
the streams' contexts stay short and alike in both deployments. The arrival time of every
streamed chunk is recorded (official ``openai`` client, ``AsyncOpenAI``). Once every stream is
producing, a **baseline** window (default 10 s) runs with no other load; then an
**interference** window: **interferers**, prompts of 1,500 tokens (random words from the
model's vocabulary, counted with its tokenizer; ``usage`` reports what the server saw) with
``max_tokens`` 4, are sent closed-loop (the next when the previous has finished; or one every
``--interval`` seconds), for at most ``--window`` seconds and ``--max-interferers`` prompts; the
window ends when the last one has finished.

ITL = gap between consecutive chunks of one stream request (a request's first chunk, its TTFT,
is no ITL), assigned to the window its later chunk falls in. Printed per deployment and window:
ITL p50/p90/p99/max/mean and the streams' total tokens/s (which also counts requests that
waited behind a prefill for their first token); the interferers' TTFT p50/p90 and count, and
how the frontend ran them (``tandem_frontend_disaggregated_requests_total``); then the ratios
agg / disagg of the interference window's ITL p90 and p99. With ``--repeats N`` the deployments
run N times, interleaved, and medians are printed.

What this can and cannot show on a small CPU machine (2 cores here): the prefill and decode
workers, the frontend and this client share the cores, so disaggregation cannot isolate compute
the way separate GPUs do. What it does remove is a decode stream waiting for a prefill in its own
engine's batch: a 1,500-token prefill is one engine step of several seconds with one thread (the
default token budget of 2,048 does not chunk it), so in agg every stream on that worker gets one
gap of that length. Such stalls are few against the hundreds of ordinary gaps in a window, so
they show in ITL p99/max and in the streams' tokens/s much more than in p90; disagg pays instead
with CPU contention (the prefill worker busy on the other core, which the decode worker, the
frontend and the client also need) and the KV pull on the decode worker, which shows as a higher
ITL p50/p90 during interference than agg's. Figures on a machine with other load are indicative.

Usage: python benchmarks/disagg_itl.py [--streams 4] [--window 45] [--interval 0] [--repeats 1]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI

from serve_util import serving

MODEL = "smollm2-135m-instruct"
DEPLOYMENTS = ("agg", "disagg")


def graph(kind: str, args: argparse.Namespace) -> str:
    engine = args.engine
    if engine == "vllm":  # vLLM's CPU build: blocks of 32, eager mode; its threads bind as vLLM decides
        flags = (
            f"{{dtype: float32, kv-cache-gib: {args.kv_cache_gib}, block-size: 32, "
            f"max-num-batched-tokens: {args.max_num_batched_tokens}, max-num-seqs: 64}}, vllm: {{enforce_eager: true}}"
        )
    else:
        flags = (
            f"{{dtype: float32, kv-cache-gib: {args.kv_cache_gib}, threads: {args.threads}, "
            f"max-num-batched-tokens: {args.max_num_batched_tokens}, max-num-seqs: 64}}"
        )
    if kind == "agg":
        return (
            f"frontend: {{host: 127.0.0.1, port: 0, router: round-robin}}\n"
            f"workers:\n  - {{count: 2, engine: {engine}, role: agg, model: {MODEL}, flags: {flags}}}\n"
        )
    return (
        f"frontend: {{host: 127.0.0.1, port: 0, router: round-robin, "
        f"max_local_prefill_length: {args.max_local_prefill_length}}}\n"
        f"workers:\n"
        f"  - {{count: 1, engine: {engine}, role: prefill, model: {MODEL}, flags: {flags}}}\n"
        f"  - {{count: 1, engine: {engine}, role: decode, model: {MODEL}, flags: {flags}}}\n"
    )


class Prompts:
    """Random-word prompts of an exact token count under the model's tokenizer (no shared prefixes)."""

    def __init__(self, seed: int) -> None:
        from tandem.models.tokenizer import load_tokenizer

        self.tok = load_tokenizer(MODEL)
        vocab = self.tok.get_vocab()
        # Byte-level BPE: "Ġword" is " word"; such tokens re-tokenize as themselves.
        self.words = sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
        self.rng = random.Random(seed)

    def make(self, n: int) -> str:
        text = self.tok.decode([self.rng.choice(self.words) for _ in range(n)]).lstrip()
        for _ in range(8):  # re-tokenizing merges or splits a few words: trim or pad to n
            enc = self.tok.encode(text, add_special_tokens=True)
            if len(enc) == n:
                break
            text = self.tok.decode(enc[:n]) if len(enc) > n else text + " the" * (n - len(enc))
        return text


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


async def stream_loop(
    client: AsyncOpenAI,
    prompts: list[str],
    args: argparse.Namespace,
    stop: asyncio.Event,
    chunks: list[list[float]],
    deadline: float,
) -> None:
    """One decode stream: streamed completions one after another until ``stop`` (or ``deadline``);
    appends each request's chunk arrival times to ``chunks``."""
    for i in range(args.max_stream_requests):
        if stop.is_set() or time.monotonic() > deadline:
            return
        times: list[float] = []
        chunks.append(times)
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompts[i % len(prompts)],
            max_tokens=args.stream_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        try:
            async for chunk in stream:
                if chunk.choices:
                    times.append(time.monotonic())
                if stop.is_set() or time.monotonic() > deadline:
                    return
        finally:
            await stream.close()


async def interferer(client: AsyncOpenAI, prompt: str, args: argparse.Namespace) -> dict:
    start = time.monotonic()
    ttft, prompt_tokens = math.nan, 0
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=args.interferer_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    try:
        async for chunk in stream:
            if chunk.choices and math.isnan(ttft):
                ttft = time.monotonic() - start
            if chunk.usage:
                prompt_tokens = chunk.usage.prompt_tokens
    finally:
        await stream.close()
    return {"ttft": ttft, "prompt_tokens": prompt_tokens}


def scrape_outcomes(url: str) -> dict[str, int]:
    """The frontend's tandem_frontend_disaggregated_requests_total, by outcome (empty in agg)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    outcomes = {}
    for line in metrics.splitlines():
        if line.startswith("tandem_frontend_disaggregated_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            outcomes[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return outcomes


def window_stats(chunks: list[list[float]], lo: float, hi: float) -> dict:
    gaps = [b - a for times in chunks for a, b in zip(times, times[1:]) if lo <= b < hi]
    tokens = sum(lo <= t < hi for times in chunks for t in times)
    return {
        "p50": pct(gaps, 50) * 1e3,
        "p90": pct(gaps, 90) * 1e3,
        "p99": pct(gaps, 99) * 1e3,
        "max": max(gaps, default=math.nan) * 1e3,
        "mean": statistics.fmean(gaps) * 1e3 if gaps else math.nan,
        "n": len(gaps),
        "tok_s": tokens / max(1e-9, hi - lo),
    }


async def measure(url: str, prompts: Prompts, args: argparse.Namespace) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    try:
        # Warm-up: both workers of either deployment see a short and a long prompt (and a KV pull).
        warm = [prompts.make(args.stream_prompt_len) for _ in range(2)] + [
            prompts.make(args.interferer_len) for _ in range(2)
        ]
        warm_start = time.monotonic()
        for pair in (warm[:2], warm[2:]):
            await asyncio.gather(
                *(client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in pair)
            )
        print(f"  warmed up in {time.monotonic() - warm_start:.0f} s", file=sys.stderr)
        # Interferer prompts made in advance (tokenizing is the client's CPU).
        texts = [prompts.make(args.interferer_len) for _ in range(args.max_interferers)]
        stop = asyncio.Event()
        hard_deadline = time.monotonic() + args.baseline + args.window + args.drain + 120
        chunks: list[list[list[float]]] = [[] for _ in range(args.streams)]
        stream_prompts = [[prompts.make(args.stream_prompt_len) for _ in range(4)] for _ in range(args.streams)]
        streams = [
            asyncio.create_task(stream_loop(client, stream_prompts[k], args, stop, chunks[k], hard_deadline))
            for k in range(args.streams)
        ]
        # Every stream producing (two chunks each), bounded.
        ready_by = time.monotonic() + 120
        while not all(c and len(c[-1]) >= 2 for c in chunks):
            if time.monotonic() > ready_by or any(t.done() for t in streams):
                for t in streams:
                    if t.done() and t.exception():
                        raise t.exception()
                raise RuntimeError("the decode streams did not all start")
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await asyncio.sleep(args.baseline)
        before = scrape_outcomes(url)
        t1 = time.monotonic()
        results: list[dict] = []
        pending: list[asyncio.Task] = []
        send_until = t1 + args.window
        for i in range(args.max_interferers):
            if time.monotonic() >= send_until:
                break
            if args.interval > 0:
                pending.append(asyncio.create_task(interferer(client, texts[i], args)))
                await asyncio.sleep(max(0.0, t1 + (i + 1) * args.interval - time.monotonic()))
            else:
                results.append(await asyncio.wait_for(interferer(client, texts[i], args), args.drain))
        if pending:
            done, late = await asyncio.wait(pending, timeout=args.drain)
            for t in late:
                t.cancel()
            results += [t.result() for t in done if not t.exception()]
            if late:
                print(f"warning: {len(late)} interferers did not finish within --drain", file=sys.stderr)
        t2 = time.monotonic()  # the window ends when the last interferer has finished
        stop.set()
        await asyncio.wait(streams, timeout=30)
        for t in streams:
            if not t.done():
                t.cancel()
        flat = [times for c in chunks for times in c]
        after = scrape_outcomes(url)
        outcomes = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        ttfts = [r["ttft"] * 1e3 for r in results]
        return {
            "base": window_stats(flat, t0, t1),
            "intf": window_stats(flat, t1, t2),
            "n_intf": len(results),
            "intf_s": t2 - t1,
            "ttft_p50": pct(ttfts, 50),
            "ttft_p90": pct(ttfts, 90),
            "prompt_tokens": statistics.median([r["prompt_tokens"] for r in results]) if results else 0,
            "outcomes": outcomes,
        }
    finally:
        await client.close()


def run_one(kind: str, tmp: Path, name: str, prompts: Prompts, args: argparse.Namespace) -> dict:
    path = tmp / f"{name}.yaml"
    path.write_text(graph(kind, args))
    start = time.monotonic()
    with serving(str(path), timeout=300) as url:
        print(f"{name}: serving after {time.monotonic() - start:.0f} s", file=sys.stderr)
        result = asyncio.run(measure(url, prompts, args))
    print(f"{name}: done after {time.monotonic() - start:.0f} s", file=sys.stderr)
    return result


def median_trial(ts: list[dict]) -> dict:
    out: dict = {}
    for key, value in ts[0].items():
        if isinstance(value, dict) and key != "outcomes":
            out[key] = {k: statistics.median(t[key][k] for t in ts) for k in value}
        elif key == "outcomes":
            out[key] = {k: sum(t[key].get(k, 0) for t in ts) for k in {o for t in ts for o in t[key]}}
        else:
            out[key] = statistics.median(t[key] for t in ts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="concurrent decode streams (default: %(default)s)")
    parser.add_argument("--stream-prompt-len", type=int, default=48, help="tokens (default: %(default)s)")
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=256,
        help="max_tokens of each stream request; re-issued when done (default: %(default)s)",
    )
    parser.add_argument("--interferer-len", type=int, default=1500, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--interferer-tokens", type=int, default=4, help="max_tokens (default: %(default)s)")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between interferers; 0 = closed loop, one at a time (default: %(default)s)",
    )
    parser.add_argument("--max-interferers", type=int, default=20, help="per deployment (default: %(default)s)")
    parser.add_argument(
        "--baseline", type=float, default=10.0, help="seconds without interferers (default: %(default)s)"
    )
    parser.add_argument(
        "--window", type=float, default=45.0, help="seconds during which interferers are sent (default: %(default)s)"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=120.0,
        help="longest wait for one interferer / the last ones (default: %(default)s)",
    )
    parser.add_argument("--max-stream-requests", type=int, default=200, help="per stream (default: %(default)s)")
    parser.add_argument(
        "--engine",
        choices=("builtin", "vllm"),
        default="builtin",
        help="the workers' engine; vllm: vLLM's CPU build, fp32 eager, blocks of 32 (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: %(default)s)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="per worker (default: %(default)s)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="per engine step; below the prompt length it chunks the prefill (default: %(default)s)",
    )
    parser.add_argument("--max-local-prefill-length", type=int, default=64, help="disagg (default: %(default)s)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run both deployments this many times, interleaved; report medians (default: %(default)s)",
    )
    parser.add_argument("--only", nargs="+", choices=DEPLOYMENTS, default=list(DEPLOYMENTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.stream_prompt_len > args.max_local_prefill_length:
        parser.error("--stream-prompt-len must be at most --max-local-prefill-length (the streams decode locally)")
    prompts = Prompts(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-disagg-itl-"))
    trials: dict[str, list[dict]] = {kind: [] for kind in args.only}
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
        for kind in args.only:
            trials[kind].append(run_one(kind, tmp, f"{kind}{repeat}", prompts, args))
    results = {kind: median_trial(ts) for kind, ts in trials.items()}
    for kind, ts in trials.items():
        if len(ts) > 1:
            print(
                f"{kind}: interference ITL p90 per trial {[round(t['intf']['p90'], 1) for t in ts]} ms, "
                f"p99 {[round(t['intf']['p99'], 1) for t in ts]} ms"
            )
    mode = f"one every {args.interval:g} s" if args.interval > 0 else "closed loop, one at a time"
    print(
        f"{MODEL} on {args.engine}, float32, "
        f"{args.threads if args.engine == 'builtin' else 'vLLM-bound'} thread(s) per worker, "
        f"token budget {args.max_num_batched_tokens}; "
        f"{args.streams} decode streams ({args.stream_prompt_len}-token prompts, {args.stream_tokens} tokens "
        f"per request); interferers: {args.interferer_len}-token prompts, max_tokens {args.interferer_tokens}, "
        f"{mode}, for {args.window:g} s; baseline {args.baseline:g} s"
        + (f"; medians of {args.repeats}" if args.repeats > 1 else "")
    )
    print(
        f"{'deployment':10} | {'window':12} | {'gaps':>5} | {'ITL p50':>8} | {'ITL p90':>8} | {'ITL p99':>8} | "
        f"{'ITL max':>8} | {'ITL mean':>8} | {'stream tok/s':>12}"
    )
    for kind, r in results.items():
        for label, key in (("baseline", "base"), ("interference", "intf")):
            w = r[key]
            print(
                f"{kind:10} | {label:12} | {w['n']:>5.0f} | {w['p50']:>5.1f} ms | {w['p90']:>5.1f} ms | "
                f"{w['p99']:>5.1f} ms | {w['max']:>5.0f} ms | {w['mean']:>5.1f} ms | {w['tok_s']:>12.1f}"
            )
    for kind, r in results.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())) or "no prefill workers"
        print(
            f"{kind}: {r['n_intf']:.0f} interferers in {r['intf_s']:.1f} s (prompt {r['prompt_tokens']:.0f} tokens), "
            f"TTFT p50 {r['ttft_p50']:.0f} ms, p90 {r['ttft_p90']:.0f} ms; frontend outcomes in the window "
            f"(interferers and stream requests): {outcomes}"
        )
    if set(results) == set(DEPLOYMENTS):
        agg, dis = results["agg"]["intf"], results["disagg"]["intf"]
        print(
            f"interference ITL p90 agg / disagg: {agg['p90'] / dis['p90']:.2f}x; "
            f"p99: {agg['p99'] / dis['p99']:.2f}x; max: {agg['max'] / dis['max']:.2f}x; "
            f"stream tok/s disagg / agg: {dis['tok_s'] / agg['tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()

"""KV tiers on the real model: does a host tier (G2), and a disk tier (G3) below it, cut TTFT on
a multi-turn workload whose working set is many times the engine's KV pool (G1)?

One builtin worker (SmolLM2-135M-Instruct) behind `tandem serve`, a small KV pool, and the same
multi-turn workload (`tandem bench run --workload multi-turn`: 24 users × 5 turns, 6 at a time,
1,000-token histories, each turn resending the growing conversation) against each deployment,
each started fresh, back to back in this run:

* **G1 only** (the baseline): a user's next turn finds its conversation evicted by the others';
* **G1+G2**: a host tier that holds the whole working set (and the same with
  ``--kv-offload-policy write-through``: the offload policy's cost);
* **G1+G2(small)**: a host tier that holds about a third of what the users active at a time
  revisit;
* **G1+G2(small)+G3**: the same, plus a disk tier that holds the rest.

With ``--scenario node``: two workers on this machine behind round-robin routing, and 7 users at
a time (odd: each user's next turn comes 7 requests later, so round-robin sends it to the other
worker; with an even number every user would stay on one worker), with

* **G1 only**; **private G2** (each worker its own host tier);
* **node-wide G2**: one host tier shared by both (``--kv-host-cache-shared``, write-through),
  the same total host memory as the two private ones.

Printed per deployment: TTFT p50/p90, output token throughput, prefix hit rate (cached prompt
tokens ÷ prompt tokens, from `usage`), and the workers' tier counters; then TTFT p90 of G1 only
÷ each (goal: ≥ 2× lower with G2 than with G1 only).

Usage: python benchmarks/kv_tiers_multiturn.py [--scenario tiers|node] [--num-kv-blocks 256] [--qps 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

from serve_util import multi_turn_figures, serving
from tandem.runtime.request_plane import RequestPlaneClient

MODEL = "smollm2-135m-instruct"


def deployments(args: argparse.Namespace, tmp: Path) -> dict[str, list[str]]:
    pool = ["--port", "0", "--num-kv-blocks", str(args.num_kv_blocks)]
    if args.scenario == "node":
        pool += ["--workers", "2", "--router", "round-robin"]
        shared = ["--kv-host-cache-shared", args.segment, "--kv-offload-policy", "write-through"]
        return {
            "g1": pool,
            "private-g2": [*pool, "--kv-host-cache-gib", str(args.host_gib / 2)],
            "node-g2": [*pool, "--kv-host-cache-gib", str(args.host_gib), *shared],
        }
    small = ["--kv-host-cache-gib", str(args.small_host_gib)]
    disk = ["--kv-disk-cache-gib", "8", "--kv-disk-cache-dir", str(tmp / "disk"), "--kv-disk-min-frequency", "2"]
    return {
        "g1": pool,
        "g2": [*pool, "--kv-host-cache-gib", str(args.host_gib)],
        "g2-write-through": [*pool, "--kv-host-cache-gib", str(args.host_gib), "--kv-offload-policy", "write-through"],
        "g2-small": [*pool, *small],
        "g2-small+g3": [*pool, *small, *disk],
    }


NAMES = {
    "g1": "G1 only",
    "g2": "G1+G2",
    "g2-write-through": "G1+G2 write-thru",
    "g2-small": "G1+G2(small)",
    "g2-small+g3": "G1+G2(small)+G3",
    "private-g2": "private G2",
    "node-g2": "node-wide G2",
}
COUNTERS = ("offloaded_g1_g2", "offloaded_g2_g3", "onboarded_g2_g1", "onboarded_g3_g1", "onboards")


def bench(url: str, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "tandem", "bench", "run", "--url", url, "--model", MODEL]
    command += ["--workload", "multi-turn", "--num-system-prompts", "1", "--system-prompt-len", "100"]
    command += ["--user-history-len", str(args.history), "--question-len", "20", "--answer-len", str(args.answer)]
    command += ["--num-users", str(args.concurrent_users), "--num-rounds", str(args.turns)]
    command += ["--num-requests", str(args.users * args.turns), "--qps", str(args.qps)]
    command += ["--seed", "0", "--no-progress", "--output", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return multi_turn_figures(out)


def worker_tiers(url: str) -> dict:
    """The workers' tier counters, summed (empty without tiers)."""
    workers = httpx.get(url + "/health", timeout=10).json()["models"][MODEL]

    async def stats() -> list[dict]:
        rpc = RequestPlaneClient()
        try:
            return [await rpc.call(w["address"], "stats", None) for w in workers]
        finally:
            await rpc.close()

    tiers = [s["tiers"] for s in asyncio.run(stats()) if s.get("tiers")]
    keys = (*COUNTERS, "onboard_seconds_total")
    return {key: sum(t[key] for t in tiers) for key in keys} if tiers else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-kv-blocks", type=int, default=256, help="G1 pool (default: %(default)s)")
    parser.add_argument("--host-gib", type=float, default=2.0, help="G2 of the G1+G2 run (default: %(default)s)")
    parser.add_argument("--small-host-gib", type=float, default=0.11, help="the small G2 (default: %(default)s)")
    parser.add_argument("--users", type=int, default=24, help="users in all (default: %(default)s)")
    parser.add_argument("--concurrent-users", type=int, default=6, help="users at a time (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=5, help="turns per user (default: %(default)s)")
    parser.add_argument("--history", type=int, default=1000, help="tokens of a user's history (default: %(default)s)")
    parser.add_argument("--answer", type=int, default=32, help="tokens per answer (default: %(default)s)")
    parser.add_argument("--qps", type=float, default=1.0, help="request rate (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=sorted(NAMES), help="run only these (default: all)")
    parser.add_argument(
        "--scenario", choices=("tiers", "node"), default="tiers", help="see the module docstring (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.scenario == "node" and args.concurrent_users % 2 == 0:
        args.concurrent_users += 1  # see the module docstring
    args.segment = f"bench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="tandem-kv-tiers-"))
    results: dict[str, dict] = {}
    try:
        for key, serve_args in deployments(args, tmp).items():
            if args.only and key not in args.only:
                continue
            with serving(*serve_args) as url:
                result = bench(url, tmp / key, args)
                result["tiers"] = worker_tiers(url)
            results[key] = result
    finally:
        segment = f"/dev/shm/tandem-kv-{args.segment}"
        if os.path.exists(segment):
            os.unlink(segment)
    conversation = 100 + args.history + args.turns * (20 + args.answer)
    working_set = args.users * conversation // 16
    workers = "2 builtin workers, round-robin" if args.scenario == "node" else "1 builtin worker"
    print(
        f"{workers} ({MODEL}), G1 {args.num_kv_blocks} blocks each; multi-turn: {args.users} users × {args.turns} "
        f"turns, {args.concurrent_users} at a time, {args.history}-token histories, answers {args.answer}, "
        f"{args.qps} req/s; working set ≈ {working_set} blocks = {working_set / args.num_kv_blocks:.1f}× G1"
    )
    print(f"{'deployment':17} | {'ok':>7} | {'TTFT p50':>10} | {'TTFT p90':>10} | {'out tok/s':>9} | {'hit rate':>8}")
    for key, r in results.items():
        print(
            f"{NAMES[key]:17} | {r['ok']:>3}/{r['sent']:<3} | {r['ttft_p50']:>7.0f} ms | {r['ttft_p90']:>7.0f} ms | "
            f"{r['tok_s']:>9.1f} | {100 * r['hit_rate']:>7.1f}%"
        )
    for key, r in results.items():
        t = r["tiers"]
        if t:
            print(
                f"{NAMES[key]}: offloaded G1→G2 {t['offloaded_g1_g2']}, G2→G3 {t['offloaded_g2_g3']}; onboarded "
                f"G2→G1 {t['onboarded_g2_g1']}, G3→G1 {t['onboarded_g3_g1']}; mean onboarding "
                f"{1000 * t['onboard_seconds_total'] / max(1, t['onboards']):.1f} ms over {t['onboards']}"
            )
    if "g1" in results:
        base = results["g1"]["ttft_p90"]
        for key, r in results.items():
            if key != "g1":
                print(
                    f"TTFT p90 G1 only / {NAMES[key]}: {base / r['ttft_p90']:.2f}x" + (" (goal >= 2x)" * (key == "g2"))
                )


if __name__ == "__main__":
    main()

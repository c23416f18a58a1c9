"""KV routing with tier credit at scale: 8 mocker workers with host tiers, a multi-turn workload.

Each of 8 agg mocker workers (Dynamo's timing polynomial, Llama-3.1-8B-sized KV of 2 MiB per
16-token block) has a small KV pool (G1, ``--g1-blocks``) and a host tier (G2,
``--host-blocks``) below it, onboarding at 25 GB/s. Users arrive at random, each holds a chat
of ``--turns`` turns (a 1,000-token history, then 20-token questions and 100-token answers;
each turn resends the conversation so far) with ``--think-s`` between turns, so about
rate × turns × think users are active at a time: far more KV than the pools hold, less than the
host tiers do. Deployments, in the same run, on the same requests:

* ``round-robin``;
* ``kv, no tier credit``: the KV router credits only blocks in a worker's pool (host and disk
  credit 0), so a user whose conversation left the pool goes wherever the load is lowest;
* ``kv, tier credit``: Dynamo's weights (host 0.75, disk 0.25), so the router sends the user
  back to the worker that holds the conversation in host memory;
* ``kv, no tiers``: the same pools without host tiers (what the tiers are worth at all).

Printed: TTFT p50/p90 and mean, the prefix hit rate (prompt tokens served from the pool or a
tier ÷ prompt tokens), and per-deployment tier onboarding; then TTFT p90 without credit ÷ with.

Method: ``tandem.bench.simulate``, the virtual-time replay of the real mocker cores, KV events
and routing policies (its docstring says what is modeled). The first and last 10% of requests
by arrival are left out of the percentiles.

Usage: python benchmarks/kv_tiers_sim.py [--users 600] [--user-rate 2.0] [--g1-blocks 768] [--host-blocks 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import statistics

from tandem.bench.simulate import SimConfig, SimRequest, SimResult, Simulation
from tandem.engine.kv_tiers.modeled import ModeledTierConfig
from tandem.engine.mocker import MockerConfig

HISTORY, QUESTION, ANSWER = 1000, 20, 100


def multi_turn_requests(args: argparse.Namespace) -> list[SimRequest]:
    """Every user's turns, with arrival times: users join as a Poisson process, turns follow
    ``think_s`` apart. A turn's prompt is the previous prompt + an answer + a new question
    (the answer text is the workload's, not the mocker's, so only prompts are reused)."""
    rng = random.Random(args.seed)
    requests: list[SimRequest] = []
    start_ms = 0.0
    for user in range(args.users):
        start_ms += rng.expovariate(args.user_rate) * 1000.0
        prompt = [rng.randrange(100, 40000) for _ in range(HISTORY)]
        for turn in range(args.turns):
            prompt = prompt + [rng.randrange(100, 40000) for _ in range(QUESTION)]
            at = start_ms + turn * args.think_s * 1000.0
            requests.append(SimRequest(f"u{user}-t{turn}", list(prompt), ANSWER, at))
            prompt = prompt + [rng.randrange(100, 40000) for _ in range(ANSWER)]
    return sorted(requests, key=lambda r: r.arrival_ms)


def summarize(results: list[SimResult]) -> dict[str, float]:
    ordered = sorted(results, key=lambda r: r.arrival_ms)
    cut = len(ordered) // 10
    kept = ordered[cut : len(ordered) - cut]
    ttfts = sorted(r.ttft_ms for r in kept)
    return {
        "p50": ttfts[len(ttfts) // 2],
        "p90": ttfts[int(len(ttfts) * 0.9)],
        "mean": statistics.fmean(ttfts),
        "hit": sum(r.cached_tokens for r in kept) / max(1, sum(r.prompt_tokens for r in kept)),
    }


def run(name: str, router: str, tiers: ModeledTierConfig, kv: dict, args: argparse.Namespace) -> dict:
    mocker = MockerConfig(num_kv_blocks=args.g1_blocks, max_num_seqs=64, speedup_ratio=0.0, tiers=tiers)
    sim = Simulation(SimConfig(num_agg=8, router=router, mocker=mocker, kv_router=kv))  # type: ignore[arg-type]
    result = summarize(sim.run(multi_turn_requests(args)))
    stats = [w.core.stats().tiers for w in sim.workers.values()]
    result["onboarded"] = sum(s.onboarded_g2_g1 for s in stats if s is not None)
    print(
        f"{name:20} | {result['p50']:>8.0f} ms | {result['p90']:>8.0f} ms | {result['mean']:>8.0f} ms | "
        f"{100 * result['hit']:>6.1f}% | {result['onboarded']:>9}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-rate", type=float, default=2.0, help="users joining per second (default: %(default)s)")
    parser.add_argument("--think-s", type=float, default=20.0, help="seconds between a user's turns")
    parser.add_argument("--g1-blocks", type=int, default=768, help="each worker's pool (default: %(default)s)")
    parser.add_argument("--host-blocks", type=int, default=4096, help="each worker's host tier (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--host-credits",
        type=float,
        nargs="+",
        help="instead: one kv run per host credit (disk credit = a third of it), to choose the default",
    )
    args = parser.parse_args()
    # Simulated workers feed the router's index directly, not through an event follower: the
    # router's "no KV events from this worker" warning does not apply.
    logging.getLogger("tandem.router.policies.kv").setLevel(logging.ERROR)
    host = ModeledTierConfig(num_host_blocks=args.host_blocks)
    active = args.user_rate * args.turns * args.think_s
    print(
        f"8 mocker workers (Dynamo timing), G1 {args.g1_blocks} + G2 {args.host_blocks} blocks each; {args.users} users "
        f"× {args.turns} turns, ~{active:.0f} active, {HISTORY}-token histories, answers {ANSWER}"
    )
    print(f"{'deployment':20} | {'TTFT p50':>11} | {'TTFT p90':>11} | {'mean':>11} | {'hit':>7} | {'onboarded':>9}")
    if args.host_credits:
        runs = {
            c: run(f"kv, host credit {c}", "kv", host, {"host_credit": c, "disk_credit": c / 3}, args)
            for c in args.host_credits
        }
        best = min(runs, key=lambda c: runs[c]["p90"])
        print(f"lowest TTFT p90 at host credit {best}")
        return
    none = {"host_credit": 0.0, "disk_credit": 0.0}
    results = {
        "rr": run("round-robin", "round-robin", host, {}, args),
        "kv-none": run("kv, no tier credit", "kv", host, none, args),
        "kv-credit": run("kv, tier credit", "kv", host, {}, args),
        "kv-no-tiers": run("kv, no tiers", "kv", dataclasses.replace(host, num_host_blocks=0), {}, args),
    }
    print(f"TTFT p90 kv without tier credit / with: {results['kv-none']['p90'] / results['kv-credit']['p90']:.2f}x")
    print(f"TTFT p90 round-robin / kv with tier credit: {results['rr']['p90'] / results['kv-credit']['p90']:.2f}x")


if __name__ == "__main__":
    main()

"""Disaggregated vs aggregated serving at scale, on the mocker's Dynamo timing model.

8 mocker workers (``MockerConfig`` defaults: Dynamo's step-time polynomial, 16,384 KV blocks of
16 tokens, 8,192 batched tokens per step like Dynamo's mocker, KV transfer at 64 GB/s of a
Llama-3.1-8B-sized KV) serve input 3,000 / output 150 tokens at Poisson request rates. For each
deployment the highest rate that meets the SLO (TTFT p90 ≤ 500 ms and ITL p90 ≤ 50 ms) is found
by bisection, and the figure is output tokens/s per worker at that rate (rate × 150 ÷ 8):

* ``agg``: 8 agg workers;
* ``disagg xPyD``: x prefill + y decode workers, every split from 1P7D to 5P3D (the best one is
  "disagg"); prompts run in two halves as the frontend runs them (``frontend/disagg.py``).

Workloads: ``random`` (every prompt unique) for agg vs disagg, both round-robin; ``shared-prefix``
(``--num-prefixes`` system prompts of 2,000 tokens, default 16, each request one of them +
1,000 unique tokens) to show what
the KV router adds: agg and disagg, each with round-robin and with ``kv``.

ITL here is every gap between consecutive tokens of a request (what ``tandem bench`` reports: the
stutter a reader sees), p90 over all gaps; the per-request mean ITL (genai-perf's definition,
which averages stalls away) is printed beside it.

Method: ``tandem.bench.simulate``, a virtual-time replay of the same ``MockerEngine`` cores and
the frontend's two-halves flow and routing policies (see its docstring for what is and is not
modeled). Served in real time, 8 workers, a frontend and a client on this 2-core machine would
be measuring the machine, not the deployment. Each rate runs ``--requests`` requests; the first
and last 10% by arrival are left out of the percentiles (ramp-up and drain).

``local_busy`` is the share of requests the frontend ran whole on a decode worker because every
prefill worker already had ``--max-prefill-queue-size`` prefills in flight (conditional
disaggregation; 0 turns it off).

Usage: python benchmarks/disagg_vs_agg.py [--requests 2000] [--workload random|shared-prefix|both]
                                          [--max-prefill-queue-size 8]
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from tandem.bench.simulate import SimConfig, SimRequest, SimResult, Simulation, poisson_arrivals
from tandem.engine.mocker import MockerConfig

ISL, OSL, WORKERS = 3000, 150, 8
TTFT_SLO_MS, ITL_SLO_MS = 500.0, 50.0
VOCAB = (3, 49152)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_requests(workload: str, rate: float, count: int, seed: int, num_prefixes: int = 16) -> list[SimRequest]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(*VOCAB) for _ in range(2000)] for _ in range(num_prefixes)]
    requests = []
    for i, at in enumerate(poisson_arrivals(rate, count, seed)):
        if workload == "shared-prefix":
            prompt = rng.choice(prefixes) + [rng.randrange(*VOCAB) for _ in range(ISL - 2000)]
        else:
            prompt = [rng.randrange(*VOCAB) for _ in range(ISL)]
        requests.append(SimRequest(f"r{i}", prompt, OSL, at))
    return requests


def measure(results: list[SimResult]) -> dict[str, float]:
    steady = sorted(results, key=lambda r: r.arrival_ms)
    cut = len(steady) // 10
    steady = steady[cut : len(steady) - cut]
    gaps = [gap for r in steady for gap in r.itl_ms]
    return {
        "ttft_p90": percentile([r.ttft_ms for r in steady], 0.9),
        "itl_p90": percentile(gaps, 0.9),
        "itl_p50": percentile(gaps, 0.5),
        "req_itl_p90": percentile([(r.token_ms[-1] - r.token_ms[0]) / (len(r.token_ms) - 1) for r in steady], 0.9),
        "hit_rate": sum(r.cached_tokens for r in steady) / sum(r.prompt_tokens for r in steady),
        "local_busy": sum(r.path == "local_busy" for r in steady) / len(steady),
    }


def run_point(deployment: dict, router: str, workload: str, rate: float, args: argparse.Namespace) -> dict:
    mocker = MockerConfig(
        speedup_ratio=0.0,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_transfer_bandwidth_gbs=args.kv_transfer_bandwidth,
    )
    sim = Simulation(
        SimConfig(router=router, mocker=mocker, max_prefill_queue_size=args.max_prefill_queue_size, **deployment)
    )
    figures = measure(sim.run(make_requests(workload, rate, args.requests, args.seed, args.num_prefixes)))
    figures["rate"] = rate
    figures["ok"] = figures["ttft_p90"] <= TTFT_SLO_MS and figures["itl_p90"] <= ITL_SLO_MS
    return figures


def best_rate(deployment: dict, router: str, workload: str, args: argparse.Namespace) -> dict | None:
    """The highest rate meeting the SLO, to ``--resolution`` req/s (bisection; None if even the lowest fails)."""
    lo, hi = args.min_rate, args.max_rate
    best = run_point(deployment, router, workload, lo, args)
    if not best["ok"]:
        return None
    while hi - lo > args.resolution:
        mid = (lo + hi) / 2
        point = run_point(deployment, router, workload, mid, args)
        if point["ok"]:
            lo, best = mid, point
        else:
            hi = mid
    return best


def name_of(deployment: dict) -> str:
    return (
        f"agg {deployment['num_agg']}"
        if "num_agg" in deployment
        else (f"disagg {deployment['num_prefill']}P{deployment['num_decode']}D")
    )


def sweep(workload: str, routers: list[str], args: argparse.Namespace) -> None:
    deployments = [{"num_agg": WORKERS}] + [
        {"num_prefill": p, "num_decode": WORKERS - p} for p in range(args.min_prefill, args.max_prefill + 1)
    ]
    print(
        f"\n## workload {workload}: ISL {ISL}, OSL {OSL}, {WORKERS} workers, SLO TTFT p90 ≤ {TTFT_SLO_MS:.0f} ms "
        f"and ITL p90 ≤ {ITL_SLO_MS:.0f} ms, {args.requests} requests per rate, "
        f"max_prefill_queue_size {args.max_prefill_queue_size}"
        + (f", {args.num_prefixes} shared prefixes" if workload == "shared-prefix" else "")
    )
    print(
        f"{'deployment':<16} {'router':<12} {'req/s':>7} {'tok/s/worker':>13} {'TTFT p90':>9} {'ITL p50':>8} "
        f"{'ITL p90':>8} {'mean-ITL p90':>13} {'hits':>6} {'local_busy':>10} {'sim s':>6}"
    )
    best: dict[tuple[str, str], float] = {}
    for router in routers:
        for deployment in deployments:
            start = time.perf_counter()
            point = best_rate(deployment, router, workload, args)
            name = name_of(deployment)
            if point is None:
                print(f"{name:<16} {router:<12} misses the SLO even at {args.min_rate} req/s")
                continue
            per_worker = point["rate"] * OSL / WORKERS
            kind = "agg" if name.startswith("agg") else "disagg"
            if per_worker > best.get((kind, router), 0.0):
                best[(kind, router)] = per_worker
            print(
                f"{name:<16} {router:<12} {point['rate']:>7.2f} {per_worker:>13.1f} {point['ttft_p90']:>9.1f} "
                f"{point['itl_p50']:>8.1f} {point['itl_p90']:>8.1f} {point['req_itl_p90']:>13.1f} "
                f"{point['hit_rate']:>6.1%} {point['local_busy']:>10.1%} {time.perf_counter() - start:>6.0f}",
                flush=True,
            )
    base = best.get(("agg", "round-robin"))
    for (kind, router), value in sorted(best.items()):
        ratio = f"{value / base:.2f}× agg round-robin" if base else "no agg baseline"
        print(f"best {kind:<6} {router:<12}: {value:7.1f} output tok/s per worker at the SLO ({ratio})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("random", "shared-prefix", "both"), default="both")
    parser.add_argument(
        "--num-prefixes",
        type=int,
        default=16,
        help="shared-prefix: system prompts of 2,000 tokens (default: %(default)s; 128 of them "
        "do not all fit in one worker's 16,384-block pool)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per rate point")
    parser.add_argument("--min-rate", type=float, default=4.0)
    parser.add_argument("--max-rate", type=float, default=128.0)
    parser.add_argument("--resolution", type=float, default=1.0, help="bisection stops at this many req/s")
    parser.add_argument("--min-prefill", type=int, default=1)
    parser.add_argument("--max-prefill", type=int, default=5)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-transfer-bandwidth", type=float, default=64.0, help="GB/s")
    parser.add_argument(
        "--max-prefill-queue-size",
        type=int,
        default=8,
        help="the frontend's conditional disaggregation (0 = always disaggregate; default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The simulation feeds the kv router's indexer directly, not through event followers, so the
    # router's "this worker publishes no KV events" warning would be wrong here.
    logging.getLogger("tandem.router.policies.kv").setLevel(logging.ERROR)
    if args.workload in ("random", "both"):
        sweep("random", ["round-robin"], args)
    if args.workload in ("shared-prefix", "both"):
        sweep("shared-prefix", ["round-robin", "kv"], args)


if __name__ == "__main__":
    main()

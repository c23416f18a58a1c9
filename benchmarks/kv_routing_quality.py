"""Routing quality: does `--router kv` cut TTFT and find the caches, against round-robin?

Four mocker workers behind `tandem serve`, each with a KV pool too small for every conversation,
run the same multi-turn workload (`tandem bench run --workload multi-turn`: 20 shared system
prompts of 1,000 tokens, 80 users × 4 turns, 8 users at a time, answers 100 ± 20 tokens, each
turn resends the growing history) under four deployments, each started fresh, in the same run:

* `round-robin` (the baseline);
* `kv` (KV events indexed from every worker);
* `kv` without events (the router indexes its own decisions, TTL 120 s);
* **oracle** for the hit rate: one worker with the pooled capacity of all four (4× KV blocks and
  batch), i.e. every request sees every cache. Its TTFT is not comparable (one engine).

Timing models (``--timing``): ``dynamo`` is Dynamo's mocker polynomial, whose fixed 16.5 ms per
prefill step plus a decode part of up to 34 ms make a cache hit save at most about a third of a
1,000-token prompt's TTFT. ``prefill-bound`` models an 8B-class model on one GPU (prefill
0.07 ms per uncached token + 3 ms; decode 8-14 ms per step as the KV pool fills), where prefill
dominates TTFT as it does for long prompts. The default speedup is 1 (real time): at higher
speedups the fixed wall-clock cost of the frontend, client and four workers on this 2-core
machine becomes a large share of every TTFT and compresses the ratios.

With ``--repeats N`` every deployment runs N times, interleaved, and the medians are printed.
Printed per deployment: TTFT p50/p90, prefix hit rate (cached prompt tokens ÷ prompt tokens,
from `usage`), throughput; and the ratios kv/round-robin for TTFT p90 (goal ≥ 2× lower) and
the gap of each hit rate to the oracle's (goal: kv within 2 points).

Usage: python benchmarks/kv_routing_quality.py [--timing dynamo|prefill-bound] [--kv-prefill-load-scale 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_util import multi_turn_figures, serving

MODEL = "smollm2-135m-instruct"

# --only names → the deployments' display names (the keys of ``runs`` in main).
DEPLOYMENTS = {
    "round-robin": "round-robin",
    "kv": "kv",
    "kv-no-events": "kv, no events",
    "oracle": "oracle (1 pooled worker)",
}

# --timing → (prefill A B C, decode D E F) mocker coefficients; None = the mocker's defaults (Dynamo's).
TIMINGS = {"dynamo": (None, None), "prefill-bound": ((0.0, 0.07, 3.0), (0.0, 6.0, 8.0))}


def graph(router: str, workers: int, blocks: int, seqs: int, args: argparse.Namespace, events: bool) -> str:
    flags = (
        f"{{speedup-ratio: {args.speedup_ratio}, num-kv-blocks: {blocks}, max-num-seqs: {seqs}, "
        f"max-num-batched-tokens: {args.max_num_batched_tokens}"
    )
    prefill, decode = TIMINGS[args.timing]
    if prefill:
        flags += f", mocker-prefill-coeffs: {list(prefill)}, mocker-decode-coeffs: {list(decode)}"
    flags += "}"
    kv = "" if events else ", kv_events: false"
    if router == "kv":
        kv += (
            f", kv_overlap_credit: {args.kv_overlap_credit}, kv_prefill_load_scale: {args.kv_prefill_load_scale}, "
            f"kv_temperature: {args.kv_temperature}"
        )
    return (
        f"frontend: {{port: 0, router: {router}{kv}}}\n"
        f"workers:\n  - {{engine: mocker, count: {workers}, flags: {flags}}}\n"
    )


def run_one(name: str, graph_text: str, tmp: Path, args: argparse.Namespace) -> dict:
    path = tmp / f"{name}.yaml"
    path.write_text(graph_text)
    with serving(str(path)) as url:
        out = tmp / name
        subprocess.run(
            [
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
                "multi-turn",
                "--num-system-prompts",
                "20",
                "--system-prompt-len",
                "1000",
                "--user-history-len",
                str(args.user_history_len),
                "--question-len",
                "20",
                "--answer-len",
                "100",
                "--answer-len-stddev",
                "20",
                "--num-users",
                "8",
                "--num-rounds",
                "4",
                "--num-requests",
                str(args.num_requests),
                "--qps",
                "1000",
                "--seed",
                str(args.seed),
                "--no-progress",
                "--output",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        figures = multi_turn_figures(out)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker speed (default: %(default)s)")
    parser.add_argument(
        "--timing", choices=sorted(TIMINGS), default="dynamo", help="mocker timing model (default: %(default)s)"
    )
    parser.add_argument("--num-kv-blocks", type=int, default=1024, help="per worker (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per worker (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--user-history-len", type=int, default=200)
    parser.add_argument("--num-requests", type=int, default=320, help="80 users × 4 turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every deployment this many times, interleaved; report medians (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-overlap-credit", type=float, default=1.0, help="both kv deployments (default: %(default)s)"
    )
    parser.add_argument(
        "--kv-prefill-load-scale", type=float, default=1.0, help="both kv deployments (default: %(default)s)"
    )
    parser.add_argument("--kv-temperature", type=float, default=0.0, help="both kv deployments (default: %(default)s)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(DEPLOYMENTS), default=None, help="run only these deployments (default: all)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-kv-quality-"))
    blocks, seqs = args.num_kv_blocks, args.max_num_seqs
    runs = {
        "round-robin": graph("round-robin", 4, blocks, seqs, args, True),
        "kv": graph("kv", 4, blocks, seqs, args, True),
        "kv, no events": graph("kv", 4, blocks, seqs, args, False),
        "oracle (1 pooled worker)": graph("round-robin", 1, 4 * blocks, 4 * seqs, args, True),
    }
    if args.only:
        runs = {DEPLOYMENTS[k]: runs[DEPLOYMENTS[k]] for k in args.only}
    trials: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's speed hits all alike
        for i, (name, text) in enumerate(runs.items()):
            trials[name].append(run_one(f"run{repeat}-{i}", text, tmp, args))
    results = {name: {key: statistics.median(t[key] for t in ts) for key in ts[0]} for name, ts in trials.items()}
    for name, ts in trials.items():
        if len(ts) > 1:
            print(
                f"{name}: TTFT p90 per trial {[round(t['ttft_p90'], 1) for t in ts]} ms, "
                f"hit rate {[round(100 * t['hit_rate'], 1) for t in ts]}%"
            )
    print(
        f"4 mocker workers ({args.timing} timing, speedup {args.speedup_ratio}, {blocks} KV blocks and {seqs} seqs each); "
        f"kv: credit {args.kv_overlap_credit}, prefill scale {args.kv_prefill_load_scale}, T {args.kv_temperature}; multi-turn: "
        f"20 system prompts × 1000 tokens, 8 users at a time, 4 turns, answers 100±20, {args.num_requests} requests"
    )
    print(f"{'deployment':26} | {'ok':>7} | {'TTFT p50':>9} | {'TTFT p90':>9} | {'hit rate':>8} | {'out tok/s':>9}")
    for name, r in results.items():
        print(
            f"{name:26} | {r['ok']:>3.0f}/{r['sent']:<3.0f} | {r['ttft_p50']:>6.1f} ms | {r['ttft_p90']:>6.1f} ms | "
            f"{r['hit_rate'] * 100:>7.1f}% | {r['tok_s']:>9.0f}"
        )
    if set(runs) != set(DEPLOYMENTS.values()):
        return  # the ratios need every deployment
    rr, kv, oracle = (results[DEPLOYMENTS[k]] for k in ("round-robin", "kv", "oracle"))
    print(f"TTFT p90 round-robin / kv: {rr['ttft_p90'] / kv['ttft_p90']:.2f}x (goal >= 2x)")
    for name in ("kv", "kv, no events", "round-robin"):
        gap = (oracle["hit_rate"] - results[name]["hit_rate"]) * 100
        print(f"hit rate gap to the oracle, {name}: {gap:.1f} points" + (" (goal <= 2)" if name == "kv" else ""))


if __name__ == "__main__":
    main()

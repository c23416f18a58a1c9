"""Does `tandem.bench.simulate` predict what `tandem serve` does? One rate, two deployments.

The disaggregation sweep (`disagg_vs_agg.py`) runs in virtual time. This check serves the same
workload for real, with `tandem serve` over mocker workers and `tandem bench run` (Poisson
arrivals, input 3,000 / output 150 token-id prompts), and prints the served and simulated TTFT
and ITL percentiles side by side for ``agg`` (2 agg workers) and ``disagg`` (1 prefill + 1
decode worker).

The served mockers run in slow motion (``--speedup-ratio 0.25`` by default: every modeled step
lasts 4× longer, the request rate is divided by 4) so the frontend, the client and the workers
sharing this 2-core machine add little to each modeled millisecond; served times are multiplied
back by the ratio before they are compared.

Usage: python benchmarks/disagg_sim_check.py [--rate 8] [--requests 200] [--speedup-ratio 0.25]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from disagg_vs_agg import ISL, OSL, make_requests, percentile
from serve_util import serving
from tandem.bench.simulate import SimConfig, Simulation
from tandem.engine.mocker import MockerConfig

MODEL = "smollm2-135m-instruct"
DEPLOYMENTS = {"agg 2": {"num_agg": 2}, "disagg 1P1D": {"num_prefill": 1, "num_decode": 1}}


def graph(deployment: dict, args: argparse.Namespace) -> str:
    flags = (
        f"{{speedup-ratio: {args.speedup_ratio}, max-num-batched-tokens: {args.max_num_batched_tokens}, "
        f"max-num-seqs: 256, num-kv-blocks: 16384}}"
    )
    groups = (
        [("agg", deployment["num_agg"])]
        if "num_agg" in deployment
        else [("prefill", deployment["num_prefill"]), ("decode", deployment["num_decode"])]
    )
    workers = "".join(f"  - {{engine: mocker, role: {role}, count: {n}, flags: {flags}}}\n" for role, n in groups)
    return f"frontend: {{port: 0, router: round-robin}}\nworkers:\n{workers}"


def served(name: str, deployment: dict, tmp: Path, args: argparse.Namespace) -> dict:
    path = tmp / f"{name.replace(' ', '_')}.yaml"
    path.write_text(graph(deployment, args))
    out = tmp / name.replace(" ", "_")
    with serving(str(path)) as url:
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
                "random",
                "--input-len",
                str(ISL),
                "--output-len",
                str(OSL),
                "--rate",
                str(args.rate * args.speedup_ratio),
                "--rate-mode",
                "poisson",
                "--num-requests",
                str(args.requests),
                "--seed",
                str(args.seed),
                "--no-progress",
                "--output",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    summary = json.loads((out / "summary.json").read_text())
    scale = args.speedup_ratio
    return {
        "ok": f"{summary['requests_ok']}/{summary['requests_sent']}",
        **{f"ttft_{q}": summary["ttft_ms"][q] * scale for q in ("p50", "p90")},
        **{f"itl_{q}": summary["itl_ms"][q] * scale for q in ("p50", "p90")},
    }


def simulated(deployment: dict, args: argparse.Namespace) -> dict:
    mocker = MockerConfig(speedup_ratio=0.0, max_num_batched_tokens=args.max_num_batched_tokens)
    results = Simulation(SimConfig(mocker=mocker, **deployment)).run(
        make_requests("random", args.rate, args.requests, args.seed)
    )
    gaps = [gap for r in results for gap in r.itl_ms]
    ttfts = [r.ttft_ms for r in results]
    return {
        "ok": f"{len(results)}/{len(results)}",
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p90": percentile(ttfts, 0.9),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p90": percentile(gaps, 0.9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=8.0, help="modeled requests per second (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--speedup-ratio", type=float, default=0.25)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-sim-check-"))
    print(
        f"input {ISL} / output {OSL}, {args.rate} req/s (modeled), {args.requests} requests; "
        f"served at speedup {args.speedup_ratio}, times in modeled ms"
    )
    print(f"{'deployment':<12} {'how':<9} {'ok':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8}")
    for name, deployment in DEPLOYMENTS.items():
        for how, figures in (
            ("served", served(name, deployment, tmp, args)),
            ("simulated", simulated(deployment, args)),
        ):
            print(
                f"{name:<12} {how:<9} {figures['ok']:>9} {figures['ttft_p50']:>9.1f} {figures['ttft_p90']:>9.1f} "
                f"{figures['itl_p50']:>8.1f} {figures['itl_p90']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

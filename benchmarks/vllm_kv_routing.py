"""KV routing on vLLM workers: `--router kv` against `round-robin` in front of two real vLLM
engines (vLLM's CPU build, SmolLM2-135M-Instruct, fp32, eager mode, blocks of 32).

Both deployments are started fresh with `tandem serve` in the same run, one after the other, with
the same workers: 2 × ``--engine vllm`` with a KV pool of ``--num-kv-blocks`` blocks each (small
on purpose: one worker cannot keep every conversation, two can if each keeps its own). The kv
router learns what each vLLM worker caches from vLLM's own KV events (relayed by the worker).

Workload (`tandem bench run --workload multi-turn`): ``--system-prompts`` shared system prompts
of ``--system-prompt-len`` tokens, users with their own history, ``--users`` at a time for
``--rounds`` turns each, answers of ``--answer-len`` tokens; each turn resends the growing
conversation. Printed per deployment: TTFT p50/p90, prefix hit rate (cached prompt tokens ÷
prompt tokens, from `usage`), output tok/s; then kv ÷ round-robin for TTFT p90 and the hit rates.
With ``--repeats N`` both deployments run N times, interleaved; medians are printed.

Usage: python benchmarks/vllm_kv_routing.py [--requests 48] [--repeats 1]
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
ROUTERS = ("round-robin", "kv")


def graph(router: str, args: argparse.Namespace) -> str:
    flags = (
        f"{{dtype: float32, block-size: 32, max-model-len: 2048, num-kv-blocks: {args.num_kv_blocks}, "
        "max-num-seqs: 16}"
    )
    return (
        f"frontend: {{port: 0, router: {router}}}\n"
        f"workers:\n  - {{engine: vllm, count: 2, model: {MODEL}, flags: {flags}, vllm: {{enforce_eager: true}}}}\n"
    )


def run_one(name: str, router: str, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    path = tmp / f"{name}.yaml"
    path.write_text(graph(router, args))
    with serving(str(path), timeout=600) as url:
        out = tmp / name
        cmd = [sys.executable, "-m", "tandem", "bench", "run", "--url", url, "--model", MODEL]
        cmd += ["--workload", "multi-turn", "--num-system-prompts", str(args.system_prompts)]
        cmd += ["--system-prompt-len", str(args.system_prompt_len), "--user-history-len", "64"]
        cmd += ["--question-len", "20", "--answer-len", str(args.answer_len), "--num-users", str(args.users)]
        cmd += ["--num-rounds", str(args.rounds), "--num-requests", str(args.requests), "--qps", "1000"]
        cmd += ["--seed", str(args.seed), "--no-progress", "--output", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        result = multi_turn_figures(out)
    print(
        f"{name:14s} TTFT p50 {result['ttft_p50']:7.0f} p90 {result['ttft_p90']:7.0f} ms | hit rate "
        f"{100 * result['hit_rate']:5.1f}% | {result['tok_s']:6.1f} out tok/s | ok {result['ok']}/{result['sent']}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system-prompts", type=int, default=6, help="distinct shared prompts (default: %(default)s)")
    parser.add_argument("--system-prompt-len", type=int, default=512, help="tokens (default: %(default)s)")
    parser.add_argument("--users", type=int, default=4, help="concurrent users (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per user (default: %(default)s)")
    parser.add_argument("--answer-len", type=int, default=32, help="tokens per answer (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=48, help="per deployment (default: %(default)s)")
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=96,
        help="per worker, of 32 tokens: about half the workload's distinct prefixes (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per router (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-vllm-kv-routing-"))
    runs: dict[str, list[dict[str, float]]] = {router: [] for router in ROUTERS}
    for repeat in range(args.repeats):
        for router in ROUTERS:
            runs[router].append(run_one(f"{router}{repeat}", router, tmp, args))
    medians = {router: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for router, rs in runs.items()}
    rr, kv = medians["round-robin"], medians["kv"]
    print(
        f"2 vLLM workers (CPU build, fp32, eager), {args.num_kv_blocks} KV blocks of 32 each; multi-turn: "
        f"{args.system_prompts} system prompts × {args.system_prompt_len} tokens, {args.users} users × "
        f"{args.rounds} turns, {args.requests} requests; medians of {args.repeats}"
    )
    print(
        f"hit rate: kv {100 * kv['hit_rate']:.1f}% vs round-robin {100 * rr['hit_rate']:.1f}%; "
        f"TTFT p90 kv ÷ round-robin = {kv['ttft_p90'] / rr['ttft_p90']:.2f} "
        f"({kv['ttft_p90']:.0f} vs {rr['ttft_p90']:.0f} ms); TTFT p50 {kv['ttft_p50']:.0f} vs {rr['ttft_p50']:.0f} ms"
    )


if __name__ == "__main__":
    main()

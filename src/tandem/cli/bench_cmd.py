"""``tandem bench``: load against any OpenAI-compatible endpoint, and reports.

tandem bench run --url http://127.0.0.1:8000 --model M --workload random --concurrency 8
tandem bench sweep --url ... --model M --rates 1 2 4 8 --output runs/sweep
tandem bench report runs/a runs/b --output runs/report
tandem bench trace-gen --output trace.jsonl --num-requests 200 --rate 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible endpoint; compare runs")
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser("run", help="one benchmark run")
    _add_run_args(run)
    run.add_argument("--concurrency", type=int, help="requests in flight (default: 1 unless --rate)")
    run.add_argument("--rate", type=float, help="requests per second (open loop)")
    run.set_defaults(func=_run)

    sweep = sub.add_parser("sweep", help="one workload at several concurrencies or rates, then one report")
    _add_run_args(sweep)
    group = sweep.add_mutually_exclusive_group(required=True)
    group.add_argument("--concurrencies", type=int, nargs="+", metavar="N")
    group.add_argument("--rates", type=float, nargs="+", metavar="R")
    sweep.set_defaults(func=_sweep, concurrency=None, rate=None)

    report = sub.add_parser("report", help="compare saved runs in a table and draw plots")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--output", help="write report.md and PNG plots here")
    report.set_defaults(func=_report)

    gen = sub.add_parser("trace-gen", help="write a small synthetic Mooncake-format trace")
    gen.add_argument("--output", required=True, help="JSONL file to write")
    gen.add_argument("--num-requests", type=int, default=100)
    gen.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    gen.add_argument("--num-prefixes", type=int, default=4)
    gen.add_argument("--prefix-blocks", type=int, default=2, help="shared hash ids per request")
    gen.add_argument("--unique-blocks", type=int, default=2, help="hash ids no other request uses")
    gen.add_argument("--output-length", type=int, default=64)
    gen.add_argument("--block-size", type=int, default=512)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_trace_gen)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    from tandem.bench.workloads.options import add_workload_args

    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    target.add_argument("--model", required=True, help="model name the server serves")
    target.add_argument(
        "--endpoint-type",
        choices=("completions", "chat"),
        default="completions",
        help="completions sends token-id prompts (exact lengths); chat sends text (default: %(default)s)",
    )
    target.add_argument("--api-key", default="EMPTY")
    target.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default: %(default)s)")
    target.add_argument("--no-stream", action="store_true", help="whole responses (TTFT = end-to-end)")
    target.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers without it)")
    target.add_argument("--temperature", type=float, default=0.0)
    target.add_argument(
        "--tokenizer",
        help="tokenizer for chat text and multi-turn answers (default: the model's, if this machine has it)",
    )
    add_workload_args(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--rate-mode", choices=("poisson", "constant"), default="poisson")
    load.add_argument("--max-concurrency", type=int, help="rate mode: cap on requests in flight")
    load.add_argument("--num-requests", type=int, help="stop after this many (default: 100 unless --duration)")
    load.add_argument("--duration", type=float, help="stop issuing after this many seconds")
    load.add_argument("--warmup-requests", type=int, default=0, help="sent first, not recorded")
    load.add_argument(
        "--grace", type=float, default=30.0, help="s in-flight requests get after a bound (default: %(default)s)"
    )
    load.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--slo", help="goodput SLOs, e.g. ttft_ms=500,itl_ms=50,e2e_ms=10000")
    out.add_argument("--output", help="run directory (default: bench-runs/TIME-WORKLOAD)")
    out.add_argument("--name", help="label of the run in reports")
    out.add_argument("--no-progress", action="store_true", help="no live progress bar")


def _check(args: argparse.Namespace) -> None:
    if args.num_requests is None and args.duration is None and args.workload not in ("trace",):
        args.num_requests = 100


def _run(args: argparse.Namespace) -> int:
    from tandem.bench.execute import default_out_dir, execute_run
    from tandem.bench.tables import compare_table

    _check(args)
    out_dir = default_out_dir(args)
    try:
        summary = execute_run(args, out_dir)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console

    Console().print(compare_table([summary]))
    print(f"run saved in {out_dir}")
    return 0 if summary.requests_ok else 1


def _sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tandem.bench.execute import default_out_dir, execute_run
    from tandem.bench.report import write_report
    from tandem.bench.tables import compare_table

    _check(args)
    base = default_out_dir(args)
    points = [("concurrency", c) for c in args.concurrencies or []] + [("rate", r) for r in args.rates or []]
    summaries, dirs = [], []
    base_seed = args.seed
    try:
        for point, (kind, value) in enumerate(points):
            # Fresh prompts per point: a later point must not hit the prefix cache of an earlier one.
            args.seed = base_seed + 1009 * point
            out = base / f"{kind}-{value:g}"
            label = f"{args.name or args.workload} {kind}={value:g}"
            summaries.append(execute_run(args, out, name=label, **{kind: value}))
            dirs.append(out)
        paths = write_report(dirs, base / "report")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Console().print(compare_table(summaries))
    print(f"sweep saved in {base}; report: {paths[0]}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tandem.bench.report import write_report
    from tandem.bench.run_files import RunFileError
    from tandem.bench.tables import print_report

    try:
        print_report(args.runs)
        if args.output:
            paths = write_report(args.runs, Path(args.output))
            print("wrote " + ", ".join(str(p) for p in paths))
    except RunFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _trace_gen(args: argparse.Namespace) -> int:
    from tandem.bench.workloads.trace import synthesize_trace, write_trace

    entries = synthesize_trace(
        num_requests=args.num_requests,
        rate=args.rate,
        num_prefixes=args.num_prefixes,
        prefix_blocks=args.prefix_blocks,
        unique_blocks=args.unique_blocks,
        output_length=args.output_length,
        block_size=args.block_size,
        seed=args.seed,
    )
    write_trace(entries, args.output)
    print(f"wrote {len(entries)} requests to {args.output}")
    return 0

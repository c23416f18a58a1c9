"""Build a workload's requests from command-line options.

Static workloads (random, shared-prefix, trace) become an iterator of requests; when a run is
bounded by time rather than by count, random and shared-prefix requests keep coming in fresh
batches (new seeds: no prompt repeats, so the prefix cache is not flattered). Multi-turn builds
user sessions instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

from tandem.bench.workloads.multi_turn import MultiTurnConfig
from tandem.bench.workloads.random_tokens import RandomWorkloadConfig, random_requests
from tandem.bench.workloads.request import BenchRequest
from tandem.bench.workloads.shared_prefix import SharedPrefixConfig, shared_prefix_requests
from tandem.bench.workloads.trace import TraceConfig, load_trace, trace_requests

WORKLOADS = ("random", "shared-prefix", "multi-turn", "trace")
BATCH = 256


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random", help="(default: %(default)s)")
    w.add_argument("--input-len", type=int, default=550, help="random: prompt tokens (default: %(default)s)")
    w.add_argument("--input-len-stddev", type=float, default=0.0, help="random: spread of prompt tokens")
    w.add_argument(
        "--output-len", type=int, default=150, help="random, shared-prefix: output tokens (default: %(default)s)"
    )
    w.add_argument("--output-len-stddev", type=float, default=0.0, help="random: spread of output tokens")
    w.add_argument(
        "--num-prefixes", type=int, default=4, help="shared-prefix: shared system prompts (default: %(default)s)"
    )
    w.add_argument(
        "--prefix-len", type=int, default=1000, help="shared-prefix: tokens per shared prompt (default: %(default)s)"
    )
    w.add_argument(
        "--question-len", type=int, default=50, help="shared-prefix, multi-turn: question tokens (default: %(default)s)"
    )
    w.add_argument("--num-users", type=int, default=4, help="multi-turn: concurrent users (default: %(default)s)")
    w.add_argument("--num-rounds", type=int, default=5, help="multi-turn: turns per user (default: %(default)s)")
    w.add_argument("--system-prompt-len", type=int, default=200, help="multi-turn: shared system prompt tokens")
    w.add_argument("--user-history-len", type=int, default=400, help="multi-turn: per-user context tokens")
    w.add_argument("--answer-len", type=int, default=32, help="multi-turn: tokens per answer (default: %(default)s)")
    w.add_argument("--num-system-prompts", type=int, default=1, help="multi-turn: distinct shared system prompts")
    w.add_argument("--answer-len-stddev", type=float, default=0.0, help="multi-turn: spread of answer tokens")
    w.add_argument("--qps", type=float, default=1.0, help="multi-turn: overall request rate (default: %(default)s)")
    w.add_argument("--trace", help="trace: Mooncake-format JSONL file")
    w.add_argument("--trace-block-size", type=int, default=512, help="trace: tokens per hash id (default: %(default)s)")
    w.add_argument(
        "--time-scale", type=float, default=1.0, help="trace: multiply the trace's gaps (0.5 = twice as fast)"
    )
    w.add_argument(
        "--vocab-size", type=int, default=32000, help="token ids are drawn below this (default: %(default)s)"
    )


def _vocab(args: argparse.Namespace) -> dict[str, Any]:
    return {"vocab_size": args.vocab_size}


def random_config(args: argparse.Namespace, num_requests: int, seed: int) -> RandomWorkloadConfig:
    return RandomWorkloadConfig(
        input_len=args.input_len,
        input_len_stddev=args.input_len_stddev,
        output_len=args.output_len,
        output_len_stddev=args.output_len_stddev,
        num_requests=num_requests,
        seed=seed,
        **_vocab(args),
    )


def shared_prefix_config(args: argparse.Namespace, num_requests: int, seed: int) -> SharedPrefixConfig:
    return SharedPrefixConfig(
        num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len,
        question_len=args.question_len,
        output_len=args.output_len,
        num_requests=num_requests,
        seed=seed,
        **_vocab(args),
    )


def multi_turn_config(args: argparse.Namespace) -> MultiTurnConfig:
    return MultiTurnConfig(
        num_users=args.num_users,
        num_rounds=args.num_rounds,
        system_prompt_len=args.system_prompt_len,
        user_history_len=args.user_history_len,
        answer_len=args.answer_len,
        qps=args.qps,
        question_len=args.question_len,
        num_system_prompts=args.num_system_prompts,
        answer_len_stddev=args.answer_len_stddev,
        seed=args.seed,
        **_vocab(args),
    )


def static_requests(args: argparse.Namespace, num_requests: int | None) -> Iterator[BenchRequest]:
    """Requests of a static workload; endless (in fresh batches) when num_requests is None."""
    if args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace FILE")
        config = TraceConfig(
            block_size=args.trace_block_size, seed=args.seed, time_scale=args.time_scale, **_vocab(args)
        )
        return iter(trace_requests(load_trace(args.trace), config))

    def batch(size: int, seed: int) -> list[BenchRequest]:
        if args.workload == "random":
            return random_requests(random_config(args, size, seed))
        return shared_prefix_requests(shared_prefix_config(args, size, seed))

    if num_requests is not None:
        return iter(batch(num_requests, args.seed))
    return itertools.chain.from_iterable(batch(BATCH, args.seed * 1_000_003 + k) for k in itertools.count())


def warmup_requests(args: argparse.Namespace, count: int) -> list[BenchRequest]:
    """Short requests that share nothing with the run's prompts (a seed of their own)."""
    if count <= 0:
        return []
    config = RandomWorkloadConfig(input_len=64, output_len=8, num_requests=count, seed=args.seed + 7919, **_vocab(args))
    return random_requests(config)


def workload_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the chosen workload, for the run summary."""
    if args.workload == "multi-turn":
        return dataclasses.asdict(multi_turn_config(args))
    if args.workload == "trace":
        return {"trace": args.trace, "block_size": args.trace_block_size, "time_scale": args.time_scale}
    config = (random_config if args.workload == "random" else shared_prefix_config)(args, 1, args.seed)
    settings = dataclasses.asdict(config)
    settings.pop("num_requests", None)
    return settings

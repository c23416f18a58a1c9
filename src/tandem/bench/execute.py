"""One `tandem bench run`: build the workload, drive the load with a live progress bar, and
write the run directory (summary.json, requests.jsonl, requests.csv)."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tandem.bench.client import BenchClient, ClientConfig, Outcome
from tandem.bench.records import RequestRecord, RunSummary
from tandem.bench.run_files import parse_slo, summarize, write_run
from tandem.bench.runner import LiveStats, LoadConfig, Runner, RunResult
from tandem.bench.workloads.multi_turn import new_session, user_gap_s
from tandem.bench.workloads.options import multi_turn_config, static_requests, warmup_requests, workload_settings
from tandem.bench.workloads.request import BenchRequest


class _ProgressBar:
    def __init__(self, progress: Progress, total: int | None) -> None:
        self.progress, self.stats = progress, LiveStats()
        self.task = progress.add_task("requests", total=total, stats="")

    def update(self, records: list[RequestRecord], elapsed_s: float) -> None:
        self.progress.update(self.task, completed=len(records), stats=self.stats.line(records, elapsed_s))


def load_config(args: argparse.Namespace, *, concurrency: int | None = None, rate: float | None = None) -> LoadConfig:
    concurrency = concurrency if concurrency is not None else args.concurrency
    rate = rate if rate is not None else args.rate
    fixed = args.workload == "trace" and rate is None and concurrency is None
    if concurrency is None and rate is None and not fixed and args.workload != "multi-turn":
        concurrency = 1
    return LoadConfig(
        concurrency=concurrency,
        rate=rate,
        rate_mode=args.rate_mode,
        max_concurrency=args.max_concurrency,
        fixed_schedule=fixed,
        num_requests=args.num_requests,
        duration_s=args.duration,
        warmup_requests=args.warmup_requests,
        grace_s=args.grace,
        seed=args.seed,
    )


def client_config(args: argparse.Namespace) -> ClientConfig:
    endpoint = "chat" if args.endpoint_type == "chat" else "completions"
    return ClientConfig(
        url=args.url,
        model=args.model,
        endpoint_type=endpoint,
        stream=not args.no_stream,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        api_key=args.api_key,
        timeout_s=args.timeout,
    )


def _as_chat(request: BenchRequest, tokenizer: Any) -> BenchRequest:
    """Chat endpoints take text: decode the token-id prompt (lengths become approximate)."""
    if request.messages is None and isinstance(request.prompt, list):
        text = tokenizer.decode(request.prompt) if tokenizer is not None else " ".join(["hi"] * request.input_tokens)
        request.messages, request.prompt = [{"role": "user", "content": text}], None
    return request


def _answer_tokens(tokenizer: Any) -> Callable[[Outcome, BenchRequest], list[int]]:
    """Multi-turn: the answer's token ids (re-tokenized text; synthetic ids when no tokenizer)."""

    def tokens(outcome: Outcome, request: BenchRequest) -> list[int]:
        if tokenizer is not None:
            return list(tokenizer.encode(outcome.text, add_special_tokens=False))
        rng = random.Random(f"{request.session_id}/{request.turn}")  # deterministic across runs
        return [rng.randrange(1000, 31000) for _ in range(outcome.output_tokens or 1)]

    return tokens


def _tokenizer(args: argparse.Namespace) -> Any:
    name = args.tokenizer or (args.model if args.endpoint_type == "chat" or args.workload == "multi-turn" else None)
    if not name:
        return None
    try:
        from tandem.models.tokenizer import load_tokenizer

        return load_tokenizer(name)
    except Exception as exc:  # a remote model name this machine does not have: fall back, say so
        Console(stderr=True).print(f"[yellow]no tokenizer for {name!r} ({exc}); using synthetic text/answers[/]")
        return None


async def _drive(args: argparse.Namespace, load: LoadConfig, runner: Runner, tokenizer: Any) -> RunResult:
    warmup = warmup_requests(args, load.warmup_requests)
    if args.endpoint_type == "chat":
        warmup = [_as_chat(r, tokenizer) for r in warmup]
    if args.workload == "multi-turn":
        config = multi_turn_config(args)
        return await runner.run_sessions(
            lambda i: _ChatSession(new_session(config, i), args, tokenizer),
            config.num_users,
            user_gap_s(config),
            _answer_tokens(tokenizer),
            warmup,
        )
    requests = static_requests(args, load.num_requests if load.duration_s is None else None)
    if args.endpoint_type == "chat":
        requests = (_as_chat(r, tokenizer) for r in requests)
    return await runner.run(requests, warmup)


class _ChatSession:
    """A multi-turn session whose turns go to the chat endpoint when asked."""

    def __init__(self, session: Any, args: argparse.Namespace, tokenizer: Any) -> None:
        self.session, self.chat, self.tokenizer = session, args.endpoint_type == "chat", tokenizer

    def first_request(self) -> BenchRequest:
        request = self.session.first_request()
        return _as_chat(request, self.tokenizer) if self.chat else request

    def next_request(self, answer_token_ids: list[int]) -> BenchRequest | None:
        request = self.session.next_request(answer_token_ids)
        return _as_chat(request, self.tokenizer) if (self.chat and request is not None) else request


def execute_run(
    args: argparse.Namespace,
    out_dir: Path,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    name: str | None = None,
    console: Console | None = None,
) -> RunSummary:
    console = console or Console()
    load = load_config(args, concurrency=concurrency, rate=rate)
    slo = parse_slo(args.slo) if args.slo else None
    tokenizer = _tokenizer(args)
    label = name or args.name or f"{args.workload} {load.describe()}"
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
    ]
    with Progress(*columns, console=console, disable=args.no_progress, transient=False) as progress:
        total = load.num_requests if args.workload != "trace" or load.num_requests else None
        bar = _ProgressBar(progress, total)

        async def main() -> RunResult:
            async with BenchClient(client_config(args)) as client:
                return await _drive(args, load, Runner(client, load, bar), tokenizer)

        result = asyncio.run(main())
    settings = {
        "workload": workload_settings(args),
        "load": vars(load),
        "endpoint_type": args.endpoint_type,
        "stream": not args.no_stream,
        "ignore_eos": not args.no_ignore_eos,
        "temperature": args.temperature,
    }
    summary = summarize(
        result.records,
        name=label,
        url=args.url,
        model=args.model,
        workload=args.workload,
        load=load.describe(),
        settings=settings,
        started_at=result.started_at,
        duration_s=result.duration_s,
        slo=slo,
        client_cpu_percent=result.cpu_percent,
        target_rate=load.rate,
        concurrency=load.concurrency,
    )
    write_run(out_dir, summary, result.records)
    return summary


def default_out_dir(args: argparse.Namespace) -> Path:
    return Path(args.output or f"bench-runs/{time.strftime('%Y%m%d-%H%M%S')}-{args.workload}")

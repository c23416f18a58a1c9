"""Routing quality of two router replicas fed by NATS against one router (issue 7's goal: the
replicas' prefix hit rate within 2 points of the single router's).

Both deployments, each started fresh (its own nats-server, workers and routers):

* **one router**: 4 mocker workers (one `tandem worker --mocker-workers 4 --event-plane nats`),
  one `tandem router --event-plane nats`, one `tandem frontend --router remote` on it;
* **two replicas**: the same workers, two `tandem router --event-plane nats`, two frontends,
  each `--router remote` on its own router; requests alternate between the frontends, so every
  turn of a conversation goes to the other replica than the turn before. Each replica indexes
  the workers' KV events from NATS and books the other's requests from its shared bookings
  (router/replica_sync.py);
* **two replicas, no sync** (``--no-replica-sync``): each replica books only its own requests,
  so it sees about half of every worker's load.

The workload is the router issue's multi-turn one (benchmarks/kv_routing_quality.py:
20 system prompts of 1,000 tokens, 8 users at a time, 4 turns, answers 100 ± 20 tokens, 320
requests), driven by tandem.bench's session runner. The hit rate is cached prompt tokens ÷
prompt tokens as the workers report them in ``usage``. Everything binds to 127.0.0.1.

Usage: python benchmarks/router_replicas_nats.py [--speedup-ratio 1] [--num-requests 320]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tandem.bench.client import BenchClient, ClientConfig, Outcome
from tandem.bench.runner import LoadConfig, Runner
from tandem.bench.workloads.multi_turn import MultiTurnConfig, new_session, user_gap_s
from tandem.bench.workloads.request import BenchRequest
from tandem.runtime.request_plane import RequestPlaneClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.infra_servers import NatsServer  # the same real nats-server the tests run
from tests.tandem_process import TandemProcess

MODEL = "smollm2-135m-instruct"
READY_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 1800.0
"""Longest a deployment's workload may run (the request count bounds it first)."""


@contextlib.contextmanager
def deployment(replicas: int, sync: bool, args: argparse.Namespace) -> Iterator[tuple[list[str], list[str]]]:
    """Start nats-server, the workers, ``replicas`` routers and as many frontends; yield
    (frontend URLs, router addresses)."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-replicas-"))
    nats_server = NatsServer(tmp / "nats")
    procs: list[TandemProcess] = []

    def start(*argv: str, ready: str) -> str:
        """Start ``tandem ARGV``; return its first output line matching ``ready``."""
        procs.append(TandemProcess(*argv))
        return procs[-1].wait_for(ready, timeout=READY_TIMEOUT_S).string.strip()

    try:
        nats_server.start()
        plane = [
            "--discovery",
            f"file:{tmp / 'discovery'}",
            "--event-plane",
            "nats",
            "--nats-url",
            nats_server.url,
            "--namespace",
            "bench",
        ]
        start(
            "worker",
            "--engine",
            "mocker",
            "--mocker-workers",
            str(args.workers),
            "--model",
            MODEL,
            "--speedup-ratio",
            str(args.speedup_ratio),
            "--num-kv-blocks",
            str(args.num_kv_blocks),
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            "--log-level",
            "WARNING",
            *plane,
            ready="serving",
        )
        routers, urls = [], []
        for _ in range(replicas):
            flags = ["--kv-prefill-load-scale", str(args.kv_prefill_load_scale)]
            flags += [] if sync else ["--no-replica-sync"]
            routers.append(start("router", *plane, *flags, ready="listening on").rsplit(" ", 1)[1])
        for router in routers:
            line = start(
                "frontend",
                *plane,
                "--port",
                "0",
                "--router",
                "remote",
                "--router-address",
                router,
                ready="frontend listening on",
            )
            urls.append(line.split(" on ")[1].split()[0].removesuffix("/v1"))
        yield urls, routers
    finally:
        for proc in reversed(procs):  # frontends first, workers last
            proc.stop(timeout=30)
        nats_server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


class AlternatingClient:
    """BenchClient's ``send`` over several frontends, taking turns request by request."""

    def __init__(self, clients: list[BenchClient]) -> None:
        self.clients, self._next = clients, 0

    async def send(self, request: BenchRequest) -> Outcome:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        return await client.send(request)


def answer_tokens(outcome: Outcome, request: BenchRequest) -> list[int]:
    """The next turn's copy of the answer: synthetic ids, the same in every run (as `tandem bench`
    does without a tokenizer)."""
    rng = random.Random(f"{request.session_id}/{request.turn}")
    return [rng.randrange(1000, 31000) for _ in range(outcome.output_tokens or 1)]


async def router_statuses(routers: list[str]) -> list[dict]:
    """Each router's ``status``."""
    client = RequestPlaneClient()
    try:
        return [await client.call(r, "status", None, timeout=5) for r in routers]
    finally:
        await client.close()


async def wait_for_workers(routers: list[str], workers: int) -> None:
    """Until every router follows every worker (and so every frontend can route)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        statuses = await router_statuses(routers)
        if all(
            len(s["workers"]) == workers and all(w["last_seq"] is not None for w in s["workers"].values())
            for s in statuses
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("routers never saw every worker")
        await asyncio.sleep(0.5)


async def run_workload(urls: list[str], routers: list[str], args: argparse.Namespace) -> dict:
    await wait_for_workers(routers, args.workers)
    config = MultiTurnConfig(
        num_users=8,
        num_rounds=4,
        system_prompt_len=1000,
        user_history_len=args.user_history_len,
        answer_len=100,
        answer_len_stddev=20,
        qps=1000,
        question_len=20,
        seed=args.seed,
        num_system_prompts=20,
    )
    load = LoadConfig(num_requests=args.num_requests, duration_s=RUN_TIMEOUT_S, seed=args.seed)
    clients = [BenchClient(ClientConfig(url=url, model=MODEL)) for url in urls]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        runner = Runner(AlternatingClient(clients), load)  # type: ignore[arg-type] - only send() is used
        result = await runner.run_sessions(
            lambda i: new_session(config, i), config.num_users, user_gap_s(config), answer_tokens
        )
    ok = [r for r in result.records if r.ok]
    statuses = await router_statuses(routers)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    return {
        "ok": len(ok),
        "sent": len(result.records),
        "duration_s": result.duration_s,
        "hit_rate": sum(r.cached_tokens for r in ok) / max(1, input_tokens),
        "router_hit_rate": (
            sum(s["cached_blocks"] for s in statuses) / max(1, sum(s["prompt_blocks"] for s in statuses))
        ),
        "routed": [s["requests_routed"] for s in statuses],
        "gaps": sum(w["gaps_recovered"] for s in statuses for w in s["workers"].values()),
        "dumps": sum(w["dumps"] for s in statuses for w in s["workers"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="mocker workers (default: %(default)s)")
    parser.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker speed (default: %(default)s)")
    parser.add_argument("--num-kv-blocks", type=int, default=1024, help="per worker (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per worker (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--user-history-len", type=int, default=200)
    parser.add_argument("--num-requests", type=int, default=320, help="80 users × 4 turns (default: %(default)s)")
    parser.add_argument("--kv-prefill-load-scale", type=float, default=1.0, help="both routers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for name, replicas, sync in (("one router", 1, True), ("two replicas", 2, True), ("two, no sync", 2, False)):
        with deployment(replicas, sync, args) as (urls, routers):
            results[name] = asyncio.run(run_workload(urls, routers, args))
    print(
        f"{args.workers} mocker workers (speedup {args.speedup_ratio}, {args.num_kv_blocks} KV blocks, "
        f"{args.max_num_seqs} seqs each), NATS event plane; multi-turn: 20 system prompts × 1000 tokens, "
        f"8 users, 4 turns, answers 100±20, {args.num_requests} requests, seed {args.seed}"
    )
    print(
        f"{'deployment':13} | {'ok':>7} | {'hit rate':>8} | {'router est.':>11} | {'routed per router':>17} | "
        f"{'gaps':>4} | {'dumps':>5} | {'time':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:13} | {r['ok']:>3}/{r['sent']:<3} | {100 * r['hit_rate']:>7.1f}% | "
            f"{100 * r['router_hit_rate']:>10.1f}% | {r['routed']!s:>17} | {r['gaps']:>4} | {r['dumps']:>5} | "
            f"{r['duration_s']:>5.0f}s"
        )
    for name in ("two replicas", "two, no sync"):
        gap = 100 * (results["one router"]["hit_rate"] - results[name]["hit_rate"])
        print(
            f"hit rate, one router − {name}: {gap:+.1f} points"
            + (" (goal: within 2)" if name == "two replicas" else "")
        )


if __name__ == "__main__":
    main()

"""What a worker's death costs: detection, removal and request migration, with etcd and file discovery.

Deployment (real processes, 127.0.0.1 only): two ``tandem worker --engine mocker`` processes (the
default Dynamo timing at ``--speedup-ratio 1``, so steps take what they would on a GPU and the
CPU of this machine is not what is measured) and one ``tandem frontend`` (round-robin,
``--migration-limit`` 1), registered in **file** discovery or in a real **etcd** (lease TTL
``--ttl``, default 10 s as in production).

Per discovery kind:

1. **baseline**: ``--streams`` concurrent streamed chat requests (official ``openai`` client,
   ``ignore_eos``, ``--max-tokens`` each) with nothing failing; chunk arrival times recorded.
2. **failure**: the same requests; once every stream has produced ``--kill-after`` chunks,
   worker A is SIGKILLed (time t0). Measured from t0:
   - **routing removal**: A leaves the frontend's ``/health`` (the frontend stops routing to a
     worker whose connection broke: it is marked down at the first failed stream, before its
     lease expires);
   - **discovery removal**: A's card leaves discovery (a separate discovery client polls
     ``list()`` every 50 ms): file expiry or etcd lease expiry, bounded by the TTL;
   - **migrated completion**: the last migrated request's completion, and how much later each
     migrated request finished than in the baseline.
   Which requests migrated: the frontend's ``tandem_frontend_migrations_total`` says how many;
   they are the ones with the longest gap spanning t0 relative to their own median ITL
   (survivors keep streaming through t0).
3. **cost**: ITL (chunk gaps) and TTFT of migrated requests and of survivors, failure run vs
   baseline: the migration gap (detection + re-prefill of prompt + generated tokens on the
   survivor) and the survivors' slowdown from the extra load.

Usage: python benchmarks/failover.py [--discovery file etcd] [--streams 16] [--max-tokens 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.infra_servers import EtcdServer, free_port  # the same real etcd the tests run
from tests.tandem_process import TandemProcess

MODEL = "smollm2-135m-instruct"


def health(url: str) -> dict:
    """The frontend's /health JSON (also sent with its 503); {} when it cannot be read."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        return json.load(exc)
    except (OSError, ValueError):
        return {}


def live_worker_ids(url: str) -> set[str]:
    return {w["worker_id"] for ws in health(url).get("models", {}).values() for w in ws}


def migrations_total(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tandem_frontend_migrations_total{") and 'outcome="migrated"' in line
    )


async def one_stream(client: AsyncOpenAI, i: int, max_tokens: int, times: list[float], stamps: dict) -> str:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Request {i}: write a long story about the number {i}."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = []
    stamps["start"] = time.perf_counter()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    stamps["end"] = time.perf_counter()
    return "".join(text)


async def run_load(url: str, args: argparse.Namespace, kill=None) -> dict:
    """Run the streams; with ``kill`` (a callable), call it once every stream has kill_after chunks."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    times: list[list[float]] = [[] for _ in range(args.streams)]
    stamps: list[dict] = [{} for _ in range(args.streams)]
    tasks = [
        asyncio.create_task(one_stream(client, i, args.max_tokens, times[i], stamps[i])) for i in range(args.streams)
    ]
    t0 = None
    if kill is not None:
        deadline = time.monotonic() + 120
        while min(len(t) for t in times) < args.kill_after and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        kill()
    texts = await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    errors = [t for t in texts if isinstance(t, BaseException)]
    return {"times": times, "stamps": stamps, "t0": t0, "errors": errors}


def gaps(ts: list[float]) -> list[float]:
    return [b - a for a, b in zip(ts, ts[1:])]


def gap_spanning(ts: list[float], t0: float) -> float | None:
    """The gap between two tokens of ``ts`` that spans ``t0`` (None if none does)."""
    return next((b - a for a, b in zip(ts, ts[1:]) if a <= t0 <= b), None)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def classify(run: dict, count: int) -> list[bool]:
    """Per request: True for the ``count`` requests (the frontend's migration counter) with the
    longest gap spanning t0, as a multiple of their own median gap. The client cannot see which
    worker served a stream; survivors keep streaming through t0 while a migrated request waits for
    the failure to be noticed and its prompt + generated tokens to be prefilled elsewhere."""
    t0, score = run["t0"], []
    for ts in run["times"]:
        g = gaps(ts)
        med = statistics.median(g) if g else 1e-4
        spanning = gap_spanning(ts, t0)
        score.append(spanning / max(med, 1e-4) if spanning is not None else 0.0)
    top = set(sorted(range(len(score)), key=score.__getitem__, reverse=True)[:count])
    return [i in top for i in range(len(score))]


def watch_removal(
    url: str, discovery_spec: str, etcd: str | None, victim: str, t0_box: list, result: dict, stop: threading.Event
) -> None:
    """Poll /health and a discovery client until the victim is gone from each; record times after t0."""
    from tandem.runtime.discovery import make_discovery

    async def poll() -> None:
        discovery = make_discovery(discovery_spec, etcd_endpoints=etcd)
        try:
            while not stop.is_set() and ("routing" not in result or "discovery" not in result):
                now = time.perf_counter()
                if t0_box:
                    if "routing" not in result and victim not in live_worker_ids(url):
                        result["routing"] = now - t0_box[0]
                    if "discovery" not in result:
                        ids = {c.worker_id for c in await discovery.list()}
                        if victim not in ids:
                            result["discovery"] = time.perf_counter() - t0_box[0]
                await asyncio.sleep(0.05)
        finally:
            await discovery.close()

    asyncio.run(poll())


def start_deployment(kind: str, tmp: Path, args: argparse.Namespace):
    etcd = None
    if kind == "etcd":
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        spec, flags = "etcd", ["--discovery", "etcd", "--etcd-endpoints", etcd.endpoint]
    else:
        spec = f"file:{tmp / 'discovery'}"
        flags = ["--discovery", spec]
    workers = [
        TandemProcess(
            "worker", "--engine", "mocker", "--model", MODEL, "--speedup-ratio", "1", "--ttl", str(args.ttl), *flags
        )
        for _ in range(2)
    ]
    ids = [w.wait_for(r"worker (\S+) serving").group(1) for w in workers]
    port = free_port()
    frontend = TandemProcess(
        "frontend", "--port", str(port), "--router", "round-robin", "--migration-limit", "1", *flags
    )
    url = frontend.wait_for(r"frontend listening on (http://\S+)/v1").group(1)
    deadline = time.monotonic() + 30
    while live_worker_ids(url) != set(ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return etcd, spec, workers, ids, frontend, url


def stop_all(etcd, workers, frontend) -> None:
    for p in [frontend, *workers]:
        p.kill()
    if etcd is not None:
        etcd.kill()


def summarize(kind: str, base: dict, fail: dict, removal: dict, migrated: list[bool], counted: float) -> dict:
    t0 = fail["t0"]
    mig = [i for i, m in enumerate(migrated) if m]
    surv = [i for i, m in enumerate(migrated) if not m]
    last_done = max((fail["stamps"][i]["end"] for i in mig), default=float("nan")) - t0
    delays = [
        (fail["stamps"][i]["end"] - fail["stamps"][i]["start"])
        - (base["stamps"][i]["end"] - base["stamps"][i]["start"])
        for i in mig
    ]
    mig_gap = [gap_spanning(fail["times"][i], t0) for i in mig]

    def itl(run: dict, idx: list[int], after: float | None = None) -> list[float]:
        return [b - a for i in idx for a, b in zip(run["times"][i], run["times"][i][1:]) if after is None or a >= after]

    def ttft(run: dict, idx: list[int]) -> list[float]:
        return [run["times"][i][0] - run["stamps"][i]["start"] for i in idx if run["times"][i]]

    everyone = list(range(len(migrated)))
    itl_base, itl_survivors = itl(base, everyone), itl(fail, surv, t0)
    itl_migrated = [g for i in mig for g in gaps([t for t in fail["times"][i] if t > t0])]
    row = {
        "kind": kind,
        "errors": len(fail["errors"]),
        "migrated": len(mig),
        "migrations_metric": counted,
        "routing_removal_s": removal.get("routing"),
        "discovery_removal_s": removal.get("discovery"),
        "last_migrated_done_s": last_done,
        "migrated_delay_p50_s": statistics.median(delays) if delays else None,
        "migration_gap_p50_ms": 1000 * statistics.median(mig_gap) if mig_gap else None,
        "migration_gap_max_ms": 1000 * max(mig_gap) if mig_gap else None,
        "ttft_p50_ms_base": 1000 * statistics.median(ttft(base, everyone)),
        "itl_p50_ms_base": 1000 * pct(itl_base, 0.5),
        "itl_p90_ms_base": 1000 * pct(itl_base, 0.9),
        "itl_p50_ms_survivors_after_kill": 1000 * pct(itl_survivors, 0.5),
        "itl_p90_ms_survivors_after_kill": 1000 * pct(itl_survivors, 0.9),
        "itl_p50_ms_migrated_after_switch": 1000 * pct(itl_migrated, 0.5),
        "itl_p90_ms_migrated_after_switch": 1000 * pct(itl_migrated, 0.9),
    }
    return row


def run_kind(kind: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="tandem-failover-") as d:
        tmp = Path(d)
        etcd, spec, workers, ids, frontend, url = start_deployment(kind, tmp, args)
        try:
            asyncio.run(run_load(url, args))  # warm-up (tokenizer, connections)
            base = asyncio.run(run_load(url, args))
            t0_box: list[float] = []
            removal: dict = {}
            stop = threading.Event()
            watcher = threading.Thread(
                target=watch_removal,
                args=(url, spec, etcd.endpoint if etcd else None, ids[0], t0_box, removal, stop),
                daemon=True,
            )
            watcher.start()

            def kill() -> None:
                workers[0].proc.kill()
                t0_box.append(time.perf_counter())

            fail = asyncio.run(run_load(url, args, kill))
            watcher.join(timeout=args.ttl + 10)
            stop.set()
            counted = migrations_total(url)
            migrated = classify(fail, int(counted))
            return summarize(kind, base, fail, removal, migrated, counted)
        finally:
            stop_all(etcd, workers, frontend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--discovery", nargs="+", default=["file", "etcd"], choices=("file", "etcd"))
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--kill-after", type=int, default=50, help="chunks every stream has before the kill")
    parser.add_argument("--ttl", type=float, default=10.0, help="discovery lease TTL (default: %(default)s)")
    args = parser.parse_args()
    rows = [run_kind(kind, args) for kind in args.discovery]
    keys = list(rows[0])
    print("\n" + " | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()

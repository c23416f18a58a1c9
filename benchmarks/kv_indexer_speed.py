"""KV indexer speed and router overhead: events/s while indexing, find_matches and route() latency.

Everything runs in this process on ``tandem.router.kv.indexer.KvIndexer`` (block size 16) and
``tandem.router.policies.kv.KvRouter``; no sockets, no msgpack (decoding is not counted).

Workload (as in the routing-quality benchmark): 20 shared system prompts of 1,000 tokens; each of
64 workers serves 1,000-token prompts (62 full blocks) made of the first ``--shared-tokens`` of a
random system prompt and a unique tail. Each worker runs a prefix cache like Tandem's engine: a
prompt's blocks already cached on that worker are not reported again, the new ones go out as
``BlockStored`` events of ``--blocks-per-event`` blocks, chained by ``parent_block_hash``, with
the engine's block hashes (``tandem.protocols.block_hash.block_hashes``, what Tandem's engine reports). Events
from the 64 workers are interleaved prompt by prompt until ``--blocks`` blocks (default 1M) are
stored (no evictions: 15,625 blocks per worker fit a 16,384-block pool).

1. **Indexing**: events/s and blocks/s of ``KvIndexer.apply`` (one call per event, as the
   event follower does). Baseline, measured in the same run on the same token lists: the router's
   re-hashing alone, ``tandem.kernels.block_hash.block_hashes(event.token_ids, 16, seed, parent)`` per
   event (the C loop when it is built, as in serving), and the same call in the pure-Python
   loop. The ratio indexing/hashing shows how much of an event's cost is the hashing (per event:
   one numpy conversion and one C call); the rest is Python dict updates (per block: engine hash → seq
   hash, a ref count, the holder bitmask: ~6 dict operations on tables of up to 1M entries, i.e.
   cache misses) and per-event dispatch. A second build with the cyclic GC off shows the GC's
   share (~0 now that holders are int bitmasks; it was ~2.9 us/block at 1M blocks when each
   block's holders were a ``set``, a container the GC walks).
2. **find_matches** p50/p99 for 1,000-token prompts against the full index: "hit" queries share
   the system prefix with every worker and their whole prompt with one worker (the worst case:
   62 lookups, each an AND of 64-bit worker masks); "miss" queries match nothing (one
   lookup). Timed without hashing and again including ``sequence_hashes`` (62 blocks of
   xxh3, which dominates).
3. **Router overhead**: ``KvRouter.route`` + ``on_first_token`` + ``on_finished`` for 1,000-token
   prompts over 64 candidate worker cards, the router's indexer holding the index of step 1
   (``--router-blocks`` to use a smaller one), open loop at ``--rate`` requests/s for
   ``--seconds``, with ``--inflight`` requests running at any time (their load is booked
   and released, as in serving). Per request: hashing (62 blocks), ``find_matches``, 64 cost
   evaluations (each with two ``ActiveLoad`` lookups, and each lookup runs ``ActiveLoad.expire``),
   booking. The breakdown line times the parts separately on the same prompts. The router's
   "no KV events" warning is silenced (no event followers run here; the index is filled directly).

Goals (issue 5): >= 1M events/s and p99 < 1 ms per match; < 1 ms p99 router overhead per
request at 100 requests/s.

Usage: python benchmarks/kv_indexer_speed.py [--blocks 1000000] [--workers 64] [--seconds 5]
       python benchmarks/kv_indexer_speed.py --blocks 200000          # quick run
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import time

from tandem.kernels import block_hash as hashing
from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import BLOCK_HASH_SEED
from tandem.protocols.kv_events import BlockStored
from tandem.router.kv.indexer import KvIndexer

BLOCK_SIZE = 16
PROMPT_TOKENS = 1000
VOCAB = 32_000
_TOKENS = list(range(VOCAB))  # token lists reference these ints, so 1M blocks fit in memory


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return rng.choices(_TOKENS, k=n)


def make_events(args: argparse.Namespace) -> tuple[list[tuple[str, BlockStored]], list[list[int]], dict]:
    """Interleaved (worker, BlockStored) events until ``args.blocks`` blocks are stored.

    Also returns some stored prompts (for hit queries) and counts.
    """
    rng = random.Random(args.seed)
    bs, shared = BLOCK_SIZE, args.shared_tokens
    systems = [rand_tokens(rng, PROMPT_TOKENS) for _ in range(args.system_prompts)]
    # Engine hashes of each system prefix, computed once (the engine hashes the same way).
    system_hashes = [block_hashes(s[:shared], bs) for s in systems]
    workers = [f"worker-{i:02d}" for i in range(args.workers)]
    cached: dict[str, set[int]] = {w: set() for w in workers}
    events: list[tuple[str, BlockStored]] = []
    prompts: list[tuple[str, list[int]]] = []
    blocks = 0
    n_prompts = 0
    while blocks < args.blocks:
        for worker in workers:
            s = rng.randrange(len(systems))
            tail = rand_tokens(rng, PROMPT_TOKENS - shared)
            tokens = systems[s][:shared] + tail
            prefix_hashes = system_hashes[s]
            hashes = prefix_hashes + block_hashes(
                tail[: (len(tail) // bs) * bs], bs, BLOCK_HASH_SEED, prefix_hashes[-1] if prefix_hashes else None
            )
            n_prompts += 1
            if len(prompts) < 4096:
                prompts.append((worker, tokens))
            have = cached[worker]
            first_new = 0
            while first_new < len(hashes) and hashes[first_new] in have:
                first_new += 1
            for start in range(first_new, len(hashes), args.blocks_per_event):
                end = min(start + args.blocks_per_event, len(hashes))
                events.append(
                    (
                        worker,
                        BlockStored(
                            block_hashes=hashes[start:end],
                            parent_block_hash=hashes[start - 1] if start else None,
                            token_ids=tokens[start * bs : end * bs],
                            block_size=bs,
                        ),
                    )
                )
                blocks += end - start
            have.update(hashes[first_new:])
            if blocks >= args.blocks:
                break
    return events, prompts, {"blocks": blocks, "prompts": n_prompts}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def fmt_us(samples: list[float]) -> str:
    return (
        f"p50 {1e6 * pct(samples, 0.50):7.1f} us   p99 {1e6 * pct(samples, 0.99):7.1f} us   "
        f"max {1e6 * max(samples):7.1f} us"
    )


def goal(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# ---- 1. indexing ----------------------------------------------------------------------------------


def bench_indexing(events: list[tuple[str, BlockStored]], n_blocks: int) -> KvIndexer:
    # Once with the cyclic GC off, to show its share (every holder set is a tracked container).
    idx = KvIndexer(BLOCK_SIZE)
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for worker, event in events:
        idx.apply(worker, event)
    nogc_s = time.perf_counter() - start
    gc.enable()
    del idx

    idx = KvIndexer(BLOCK_SIZE)
    gc.collect()
    start = time.perf_counter()
    for worker, event in events:
        idx.apply(worker, event)
    index_s = time.perf_counter() - start
    assert idx.stats.blocks_stored == n_blocks and idx.stats.unknown_parents == 0, idx.stats

    # Baseline: the re-hashing alone, the same call the indexer makes (parent: any int, same cost).
    start = time.perf_counter()
    for _, event in events:
        block_hashes(event.token_ids, BLOCK_SIZE, BLOCK_HASH_SEED, 0 if event.parent_block_hash is not None else None)
    hash_s = time.perf_counter() - start

    # The same hashes in the pure-Python loop (what the indexer cost before the C loop).
    native = hashing._native_fn
    hashing._native_fn = None
    try:
        start = time.perf_counter()
        for _, event in events:
            block_hashes(
                event.token_ids, BLOCK_SIZE, BLOCK_HASH_SEED, 0 if event.parent_block_hash is not None else None
            )
        python_s = time.perf_counter() - start
    finally:
        hashing._native_fn = native

    n_events = len(events)
    print(
        f"\n1. Indexing {n_events:,} BlockStored events ({n_blocks:,} blocks, "
        f"{n_blocks / n_events:.2f} blocks/event) from {len(idx.workers())} workers"
    )
    print(
        f"   index: {idx.num_blocks():,} distinct sequence hashes, "
        f"{sum(idx.blocks_of(w) for w in idx.workers()):,} (worker, block) entries"
    )
    print(
        f"   KvIndexer.apply             {n_events / index_s:12,.0f} events/s  {n_blocks / index_s:12,.0f} blocks/s"
        f"  ({1e6 * index_s / n_blocks:.2f} us/block, {index_s:.2f} s)"
    )
    print(
        f"   baseline block_hashes only  {n_events / hash_s:12,.0f} events/s  {n_blocks / hash_s:12,.0f} blocks/s"
        f"  ({1e6 * hash_s / n_blocks:.2f} us/block)"
    )
    print(
        f"   block_hashes, Python loop   {n_events / python_s:12,.0f} events/s  {n_blocks / python_s:12,.0f} blocks/s"
        f"  ({1e6 * python_s / n_blocks:.2f} us/block; the C loop is {python_s / hash_s:.1f}x faster)"
    )
    print(
        f"   KvIndexer.apply, GC off     {n_events / nogc_s:12,.0f} events/s  {n_blocks / nogc_s:12,.0f} blocks/s"
        f"  ({1e6 * nogc_s / n_blocks:.2f} us/block; GC on - off: "
        f"{1e6 * (index_s - nogc_s) / n_blocks:+.2f} us/block)"
    )
    print(
        f"   ratio indexing/hashing {index_s / hash_s:.2f}x: hashing {100 * hash_s / index_s:.0f}% of the time, "
        f"dict updates + dispatch {100 * (index_s - hash_s) / index_s:.0f}% "
        f"({1e6 * (index_s - hash_s) / n_blocks:.2f} us/block)"
    )
    print(
        f"   goal >= 1,000,000 events/s: {goal(n_events / index_s >= 1e6)} "
        f"(needs {n_events / n_blocks:.2f} us/block at {n_blocks / n_events:.2f} blocks/event)"
    )
    return idx


# ---- 2. find_matches ------------------------------------------------------------------------------


def bench_find_matches(idx: KvIndexer, prompts: list[tuple[str, list[int]]], n: int, seed: int) -> None:
    rng = random.Random(seed + 1)
    hit_prompts = [prompts[rng.randrange(len(prompts))][1] for _ in range(n)]
    miss_prompts = [rand_tokens(rng, PROMPT_TOKENS) for _ in range(n)]
    print(
        f"\n2. find_matches for {PROMPT_TOKENS}-token prompts ({PROMPT_TOKENS // BLOCK_SIZE} blocks), "
        f"{n:,} queries each, index of {idx.num_blocks():,} sequence hashes"
    )
    worst = 0.0
    for label, queries in (("hit ", hit_prompts), ("miss", miss_prompts)):
        hashed = [idx.sequence_hashes(q) for q in queries]
        matches = idx.find_matches(hashed[0])
        if label == "hit ":
            example = (
                f"   (a hit query matches {len(matches)} workers, "
                f"{max(matches.values()) if matches else 0} blocks on the best, "
                f"{min(matches.values()) if matches else 0} on the others)"
            )
        find_only, with_hash = [], []
        gc.collect()
        for q, hs in zip(queries, hashed):
            t0 = time.perf_counter()
            idx.find_matches(hs)
            t1 = time.perf_counter()
            idx.find_matches(idx.sequence_hashes(q))
            t2 = time.perf_counter()
            find_only.append(t1 - t0)
            with_hash.append(t2 - t1)
        worst = max(worst, pct(find_only, 0.99))
        print(f"   {label} find_matches            {fmt_us(find_only)}")
        print(f"   {label} sequence_hashes + find  {fmt_us(with_hash)}")
    print(example)
    print(f"   goal p99 < 1 ms per match: {goal(worst < 1e-3)}")


# ---- 3. router overhead ---------------------------------------------------------------------------


def bench_router(
    events: list[tuple[str, BlockStored]],
    prompts: list[tuple[str, list[int]]],
    args: argparse.Namespace,
    idx: KvIndexer | None,
) -> None:
    from tandem.protocols.worker_card import WorkerCard
    from tandem.router.policies.kv import KvRouter, KvRouterConfig
    from tandem.router.worker_pool import WorkerPool
    from tandem.runtime.discovery.memory import MemoryDiscovery
    from tandem.runtime.request_plane.client import RequestPlaneClient

    logging.getLogger("tandem.router.policies.kv").setLevel(logging.ERROR)  # no followers here: no warning
    router = KvRouter(
        WorkerPool(MemoryDiscovery()), RequestPlaneClient(), KvRouterConfig(use_kv_events=True, seed=args.seed)
    )
    if idx is not None and args.router_blocks >= args.blocks:
        router.indexer = idx  # the full index of step 1
    else:
        applied = 0
        for worker, event in events:
            if applied >= args.router_blocks:
                break
            router.indexer.apply(worker, event)
            applied += len(event.block_hashes)
    cards = [
        WorkerCard(
            worker_id=f"worker-{i:02d}",
            model="m",
            tokenizer="m",
            chat_template="m",
            context_length=8192,
            block_size=BLOCK_SIZE,
            total_kv_blocks=16384,
            request_plane_address="127.0.0.1:1",
        )
        for i in range(args.workers)
    ]
    rng = random.Random(args.seed + 2)
    n = int(args.rate * args.seconds)
    # Half the requests continue a stored prompt (long hits), half are new prompts on a system prefix.
    queries = []
    for i in range(n):
        if i % 2:
            queries.append(prompts[rng.randrange(len(prompts))][1])
        else:
            base = prompts[rng.randrange(len(prompts))][1]
            queries.append(base[: args.shared_tokens] + rand_tokens(rng, PROMPT_TOKENS - args.shared_tokens))
    route_s, first_s, finish_s, total_s = [], [], [], []
    inflight: list[str] = []
    interval = 1.0 / args.rate
    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each GC pass during the run
    gc_start: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - gc_start[0]))

    gc.collect()
    gc.callbacks.append(on_gc)
    next_at = time.perf_counter()
    for i, tokens in enumerate(queries):
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        next_at += interval
        rid = f"req-{i}"
        t0 = time.perf_counter()
        router.route(cards, tokens, rid, None)
        t1 = time.perf_counter()
        route_s.append(t1 - t0)
        inflight.append(rid)
        # The oldest in-flight request gets its first token and finishes (a steady --inflight).
        if len(inflight) > args.inflight:
            done = inflight.pop(0)
            t2 = time.perf_counter()
            router.on_first_token(done)
            t3 = time.perf_counter()
            router.on_finished(done)
            t4 = time.perf_counter()
            first_s.append(t3 - t2)
            finish_s.append(t4 - t3)
            total_s.append(t1 - t0 + t4 - t2)
    gc.callbacks.remove(on_gc)
    print(
        f"\n3. Router overhead: KvRouter.route over {len(cards)} candidates, {n:,} requests of "
        f"{PROMPT_TOKENS} tokens, open loop at {args.rate:g} req/s, {args.inflight} in flight, "
        f"index of {router.indexer.num_blocks():,} sequence hashes"
    )
    print(f"   route()                      {fmt_us(route_s)}")
    print(f"   on_first_token()             {fmt_us(first_s)}")
    print(f"   on_finished()                {fmt_us(finish_s)}")
    print(f"   per request (all three)      {fmt_us(total_s)}")
    full = [p for g, p in pauses if g == 2]
    print(
        f"   cyclic GC during the run: {len(pauses)} passes, {len(full)} full (gen 2)"
        + (f", full pass {1e3 * max(full):.1f} ms" if full else "")
        + (f", max young pass {1e3 * max(p for g, p in pauses if g < 2):.2f} ms" if len(full) < len(pauses) else "")
        + " (a request that triggers one pays it)"
    )
    print(
        f"   router hit rate {router.hit_rate:.2f}, mean overhead (router's own figure) "
        f"{router.status([])['overhead_ms_mean']:.3f} ms"
    )
    # What bounds route(): its parts, timed separately on the same prompts and the same load.
    from tandem.router.kv.cost import worker_costs

    sample = queries[: min(len(queries), 500)]
    load, cost, bsz = router.load, router.cost, router.block_size
    t0 = time.perf_counter()
    hashed = [router.indexer.sequence_hashes(q) for q in sample]
    t1 = time.perf_counter()
    found = [router.indexer.find_matches(hs) for hs in hashed]
    t2 = time.perf_counter()
    ids = [c.worker_id for c in cards]
    for q, m in zip(sample, found):
        worker_costs(load.loads(ids), len(q), m, bsz, cost)
    t3 = time.perf_counter()
    k = len(sample)
    parts = {"hashing": (t1 - t0) / k, "find_matches": (t2 - t1) / k, f"loads + {len(cards)} costs": (t3 - t2) / k}
    # The same requests back to back (no sleep, caches hot), booked and released the same way.
    hot_s = []
    for i, tokens in enumerate(queries):
        rid = f"hot-{i}"
        t0 = time.perf_counter()
        router.route(cards, tokens, rid, None)
        hot_s.append(time.perf_counter() - t0)
        inflight.append(rid)
        if len(inflight) > args.inflight:
            done = inflight.pop(0)
            router.on_first_token(done)
            router.on_finished(done)
    print(f"   route() back to back (hot)   {fmt_us(hot_s)}")
    rest = statistics.fmean(hot_s) - sum(parts.values())
    print(
        f"   route() mean back to back {1e6 * statistics.fmean(hot_s):.0f} us = "
        + " + ".join(f"{name} {1e6 * v:.0f} us" for name, v in parts.items())
        + f" + selection/booking ~{1e6 * rest:.0f} us; open loop mean {1e6 * statistics.fmean(route_s):.0f} us "
        "(the difference: running cold after a pause)"
    )
    # Baseline for the open loop: the same fixed work (hashing one prompt) back to back and after
    # the open loop's pause. On this VM any 10 ms pause, sleep or busy-wait, slows the next
    # hundreds of microseconds of Python several-fold, whatever the code.
    back, paused = [], []
    for tokens in queries[:300]:
        t0 = time.perf_counter()
        router.indexer.sequence_hashes(tokens)
        back.append(time.perf_counter() - t0)
    for tokens in queries[:300]:
        time.sleep(interval)
        t0 = time.perf_counter()
        router.indexer.sequence_hashes(tokens)
        paused.append(time.perf_counter() - t0)
    print(f"   baseline: hashing one prompt back to back  {fmt_us(back)}")
    print(
        f"   baseline: the same after a {1e3 * interval:g} ms pause  {fmt_us(paused)}  "
        f"(x{pct(paused, 0.5) / pct(back, 0.5):.1f} at p50: the machine's cost of pausing, not the router's)"
    )
    print(
        f"   goal < 1 ms p99 per request: {goal(pct(total_s, 0.99) < 1e-3)} "
        f"(back to back: {goal(pct(hot_s, 0.99) < 1e-3)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1_000_000, help="blocks to index (sum over workers)")
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--system-prompts", type=int, default=20)
    parser.add_argument(
        "--shared-tokens",
        type=int,
        default=768,
        help="tokens of a system prompt at the start of each 1,000-token prompt",
    )
    parser.add_argument("--blocks-per-event", type=int, default=4)
    parser.add_argument("--queries", type=int, default=5000, help="find_matches queries of each kind")
    parser.add_argument("--rate", type=float, default=100.0, help="router requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="router open-loop duration")
    parser.add_argument("--inflight", type=int, default=64, help="requests running at once in step 3")
    parser.add_argument(
        "--router-blocks",
        type=int,
        default=None,
        help="blocks in the router's index (default: the full index of step 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.shared_tokens <= PROMPT_TOKENS:
        parser.error("--shared-tokens must be within 0..1000")
    if args.router_blocks is None:
        args.router_blocks = args.blocks

    t0 = time.perf_counter()
    events, prompts, counts = make_events(args)
    print(
        f"workload: {args.workers} workers, {counts['prompts']:,} prompts of {PROMPT_TOKENS} tokens "
        f"({args.shared_tokens} from one of {args.system_prompts} system prompts), "
        f"{len(events):,} events, {counts['blocks']:,} blocks (generated in {time.perf_counter() - t0:.1f} s)"
    )
    idx = bench_indexing(events, counts["blocks"])
    bench_find_matches(idx, prompts, args.queries, args.seed)
    bench_router(events, prompts, args, idx)


if __name__ == "__main__":
    main()

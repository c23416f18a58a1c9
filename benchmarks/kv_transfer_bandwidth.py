"""KV transfer bandwidth: pull a 4,096-token prompt's KV blocks over shared memory and TCP loopback.

The payload is the default model's KV for 4,096 tokens (SmolLM2-135M: 30 layers, K and V, block
16 → 256 blocks of 30 × 2 × 16 × 3 kv heads × 64 head_dim elements), in float32 (188.7 MB) and
bfloat16 (94.4 MB). A `KvTransferServer` runs in a child process holding the export under many
transfer ids (one per pull, since a pull releases its transfer); this process pulls it N times
with `pull_blocks` over each path and times each pull from connect to a verified payload
(checksum and block hashes checked; the payload view is then closed):

  * shm (pool)  — the default server: the payload is copied into a reused shared-memory segment;
  * shm (fresh) — ``shm_pool_bytes=0``: a new segment per pull, unlinked after the ack (first
    touch of every page is a page fault, which this path pays on every pull);
  * tcp         — forced TCP over 127.0.0.1.

Baseline, measured in the same run on the same byte count: a plain memory copy into a
preallocated buffer (numpy ``copyto``; a bytearray slice copy is also printed, as it is much
slower on some machines). Reported: median GB/s (1 GB = 1e9 bytes) and each path's ratio to the
numpy copy (goal: shm ≥ 0.5). The cases run interleaved, round after round, so
that other load on the machine affects them alike.

Usage: python benchmarks/kv_transfer_bandwidth.py [--pulls 5] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from tandem.engine.kv_transfer import tensor_to_export
from tandem.protocols.block_hash import block_hashes
from tandem.transfer import KvTransferServer, KvTransferServerConfig, TransferStore, TransferStoreConfig, pull_blocks
from tandem.transfer.wire import block_nbytes

PROMPT_TOKENS = 4096
BLOCK_SIZE = 16
BLOCK_SHAPE = [30, 2, BLOCK_SIZE, 3, 64]  # SmolLM2-135M: layers, (k, v), block, kv heads, head_dim
PATHS = (("shm (pool)", "pool", "shm"), ("shm (fresh)", "fresh", "shm"), ("tcp", "pool", "tcp"))
MAX_SECONDS_PER_CASE = 60.0  # per dtype, and per pull's timeout


def make_export(dtype: str):
    tokens = list(range(100, 100 + PROMPT_TOKENS))
    num_blocks = PROMPT_TOKENS // BLOCK_SIZE
    data = torch.randn(num_blocks, *BLOCK_SHAPE, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    return tensor_to_export(data, block_hashes(tokens, BLOCK_SIZE), tokens, BLOCK_SIZE, 1337)


async def serve(dtypes: list[str], copies: int) -> None:
    """Child: hold each dtype's export ``copies`` times; serve it from a pooled and a fresh-segment
    server; print both addresses; stop when stdin closes."""
    store = TransferStore(TransferStoreConfig(ttl_s=3600))
    for dtype in dtypes:
        export = make_export(dtype)
        for index in range(copies):
            store.hold(f"{dtype}-{index}", export)  # every entry shares the one payload
    pooled = KvTransferServer(store)
    fresh = KvTransferServer(store, config=KvTransferServerConfig(shm_pool_bytes=0))
    print(await pooled.start(), await fresh.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await pooled.stop()
    await fresh.stop()
    store.close()


class CopyBaseline:
    """Plain memory copies of ``nbytes`` into preallocated (already faulted-in) buffers."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        self.src_bytes, self.dst_bytes = self.src.tobytes(), bytearray(nbytes)
        self.numpy_copy()
        self.slice_copy()

    def numpy_copy(self) -> None:
        np.copyto(self.dst, self.src)

    def slice_copy(self) -> None:
        self.dst_bytes[:] = self.src_bytes


async def timed_pull(address: str, transfer_id: str, path: str) -> tuple[float, str]:
    """Seconds of one pull (connect to verified payload) and the path the server used."""
    start = time.perf_counter()
    pulled = await pull_blocks(address, transfer_id, path=path, timeout_s=MAX_SECONDS_PER_CASE)
    elapsed = time.perf_counter() - start
    used = pulled.path
    pulled.close()
    return elapsed, used


async def measure_dtype(addresses: dict[str, str], dtype: str, pulls: int) -> None:
    """Rounds of: both copies, then one pull per path; the cases interleave, so load from other
    processes on the machine hits them alike. Round 0 is a warm-up."""
    nbytes = (PROMPT_TOKENS // BLOCK_SIZE) * block_nbytes(BLOCK_SHAPE, dtype)
    baseline = CopyBaseline(nbytes)
    seconds: dict[str, list[float]] = {"numpy": [], "slice": [], **{label: [] for label, _, _ in PATHS}}
    used: dict[str, str] = {}
    deadline = time.perf_counter() + MAX_SECONDS_PER_CASE
    for round_index in range(pulls + 1):
        timings = {}
        for name, copy in (("numpy", baseline.numpy_copy), ("slice", baseline.slice_copy)):
            start = time.perf_counter()
            copy()
            timings[name] = time.perf_counter() - start
        for position, (label, server, path) in enumerate(PATHS):
            transfer_id = f"{dtype}-{round_index * len(PATHS) + position}"
            timings[label], used[label] = await timed_pull(addresses[server], transfer_id, path)
        if round_index > 0:
            for name, value in timings.items():
                seconds[name].append(value)
        if time.perf_counter() > deadline and round_index > 0:
            break
    rate = {name: nbytes / statistics.median(values) / 1e9 for name, values in seconds.items()}
    memcpy = rate["numpy"]
    print(
        f"\n{dtype}: {PROMPT_TOKENS} tokens = {PROMPT_TOKENS // BLOCK_SIZE} blocks x "
        f"{block_nbytes(BLOCK_SHAPE, dtype):,} B = {nbytes / 1e6:.1f} MB; median of {len(seconds['numpy'])} rounds"
    )
    print(f"  {'memcpy (numpy, preallocated)':32s} {memcpy:6.2f} GB/s   1.00")
    print(f"  {'memcpy (bytearray slice)':32s} {rate['slice']:6.2f} GB/s   {rate['slice'] / memcpy:.2f}")
    for label, _, _ in PATHS:
        print(
            f"  {'pull ' + label:32s} {rate[label]:6.2f} GB/s   {rate[label] / memcpy:.2f}   (path used: {used[label]})"
        )


async def measure(addresses: dict[str, str], dtypes: list[str], pulls: int) -> None:
    for dtype in dtypes:
        await measure_dtype(addresses, dtype, pulls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pulls", type=int, default=5, help="timed pulls per path and dtype (plus one warm-up)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated KV dtypes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if args.serve:
        asyncio.run(serve(dtypes, args.copies))
        return
    pulls = max(1, min(args.pulls, 50))
    copies = len(PATHS) * (pulls + 1)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--copies", str(copies), "--dtypes", args.dtypes],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        pooled, fresh = child.stdout.readline().split()
        print(f"server process {child.pid}: pooled {pooled}, fresh-segment {fresh}")
        asyncio.run(measure({"pool": pooled, "fresh": fresh}, dtypes, pulls))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()

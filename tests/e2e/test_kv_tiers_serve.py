"""KV tiers end to end on the real model: `tandem serve` with a host-memory tier (G2) and a disk
tier (G3) below a small KV pool (G1), driven by the official openai client.

Greedy outputs must be token-for-token the same whether a prompt's prefix comes from G1, G2,
G3, the node-wide host tier of another worker, or is recomputed; and a corrupt, truncated or
missing block file, a full disk or a worker killed mid-offload costs a recompute, never a wrong
token. The worker's own stats say which tier served each request.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import random
import signal
import subprocess
import time
import uuid

import httpx
import openai
import pytest
from tests.e2e.serve_process import ServeProcess
from tests.support import router_status, run, worker_stats

from tandem.protocols.block_hash import block_hashes

MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 300  # 18 full blocks are matchable (the last token is always computed)
MATCHABLE = (PROMPT_TOKENS - 1) // 16 * 16
BLOCK_BYTES_FP32 = 2 * 30 * 16 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32
# G1 holds one prompt (20 blocks) at a time; G2 a little more than one prompt's full blocks.
POOL = ["--dtype", "float32", "--num-kv-blocks", "24", "--max-num-seqs", "4"]
HOST_GIB = str(22 * BLOCK_BYTES_FP32 / 2**30)

pytestmark = pytest.mark.slow


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(PROMPT_TOKENS)]


PROMPTS = [_prompt(seed) for seed in range(3)]


class Server:
    def __init__(self, *args: str) -> None:
        self.serve = ServeProcess("--port", "0", *POOL, *args)
        self.url = self.serve.wait_ready()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    def workers(self) -> list[dict]:
        return httpx.get(self.url + "/health", timeout=10).json()["models"][MODEL]

    def tiers(self, index: int = 0) -> dict:
        address = sorted(w["address"] for w in self.workers())[index]
        return run(worker_stats(address))["tiers"]

    def complete(self, prompt: list[int], max_tokens: int = 12) -> tuple[list[str], int]:
        """Greedy completion: (the output as tokens' text pieces, cached prompt tokens)."""
        out = self.client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].logprobs.tokens, out.usage.prompt_tokens_details.cached_tokens

    def stop(self) -> None:
        self.serve.stop()


def _delta(after: dict, before: dict, key: str) -> int:
    return after[key] - before[key]


def _block_files(disk_dir: str, prompt: list[int]) -> list[str]:
    """The disk tier's files of the prompt's full blocks, in order (absent ones skipped)."""
    files = []
    for block_hash in block_hashes(prompt, 16):
        files += glob.glob(os.path.join(disk_dir, "worker-0", "*", f"{block_hash:016x}.kvb"))
    return files


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    disk = str(tmp_path_factory.mktemp("kv-disk"))
    server = Server(
        "--kv-host-cache-gib", HOST_GIB, "--kv-disk-cache-gib", "1", "--kv-disk-cache-dir", disk,
        "--kv-disk-min-frequency", "1", "--kv-offload-policy", "evict",
    )  # fmt: skip
    try:
        # The reference: every prompt computed from scratch (nothing cached yet).
        reference = []
        for prompt in PROMPTS:
            tokens, cached = server.complete(prompt)
            assert cached == 0
            reference.append(tokens)
        yield server, reference, disk
    finally:
        server.stop()


def test_greedy_output_is_the_same_from_g1_g2_g3_as_recomputed(tiered):
    server, reference, _ = tiered
    # PROMPTS[2] ran last: its blocks are still in G1.
    before = server.tiers()
    assert server.complete(PROMPTS[2]) == (reference[2], MATCHABLE)
    after = server.tiers()
    assert _delta(after, before, "onboarded_g2_g1") == 0 and _delta(after, before, "onboarded_g3_g1") == 0
    # PROMPTS[1] was pushed out of G1 into G2 by PROMPTS[2].
    before = after
    assert server.complete(PROMPTS[1]) == (reference[1], MATCHABLE)
    after = server.tiers()
    assert _delta(after, before, "onboarded_g2_g1") >= 10
    # PROMPTS[0]'s tail blocks were pushed on from G2 to disk.
    before = after
    assert server.complete(PROMPTS[0]) == (reference[0], MATCHABLE)
    after = server.tiers()
    assert _delta(after, before, "onboarded_g3_g1") >= 5
    assert after["offloaded_g1_g2"] > 0 and after["offloaded_g2_g3"] > 0
    assert after["onboards"] > before["onboards"] and after["onboard_seconds_total"] > 0
    # The frontend exports the tiers (it polls the workers' stats every 2 s).
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        onboarded = [
            line for line in metrics.splitlines() if line.startswith("tandem_worker_kv_onboarded_blocks_total")
        ]
        if any('path="g3_g1"' in line and not line.endswith(" 0.0") for line in onboarded):
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.5)
    for family in (
        "tandem_worker_kv_tier_blocks{",
        "tandem_worker_kv_offloaded_blocks_total{",
        "tandem_worker_kv_onboard_seconds_count{",
    ):
        assert family in metrics


def test_greedy_output_is_the_same_under_preemption(tiered):
    server, _, _ = tiered
    prompts = [_prompt(seed)[:170] for seed in (10, 11)]  # 11 blocks each: both are admitted...

    def complete(prompt: list[int]) -> list[str]:
        return server.complete(prompt, max_tokens=48)[0]  # ...but 14 blocks each do not fit in 24

    reference = [complete(p) for p in prompts]
    before = run(worker_stats(server.workers()[0]["address"]))["num_preemptions"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(complete, prompts))
    assert results == reference
    assert run(worker_stats(server.workers()[0]["address"]))["num_preemptions"] > before


def test_a_corrupt_or_missing_block_file_is_recomputed(tiered):
    server, reference, disk = tiered
    # Push PROMPTS[1] down: run the other two so that its blocks leave G1 and G2.
    for index in (0, 2, 0, 2):
        assert server.complete(PROMPTS[index])[0] == reference[index]
    files = _block_files(disk, PROMPTS[1])
    assert len(files) >= 6, "PROMPTS[1] never reached the disk tier"
    with open(files[3], "r+b") as f:  # flip one byte of the KV payload
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.unlink(files[5])
    before = server.tiers()
    assert server.complete(PROMPTS[1])[0] == reference[1]
    after = server.tiers()
    assert _delta(after, before, "disk_corrupt_blocks") + _delta(after, before, "disk_missing_blocks") == 1


def test_full_disk_is_logged_counted_and_served_without(tmp_path):
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root)")
    try:
        server = Server("--kv-disk-cache-gib", "1", "--kv-disk-cache-dir", str(mount), "--kv-disk-min-frequency", "1")
        try:
            first = [server.complete(p)[0] for p in PROMPTS]  # evictions fill the 1 MiB disk at once
            again = [server.complete(p)[0] for p in PROMPTS]
            assert again == first
            tiers = server.tiers()
            assert tiers["disk_write_errors"] >= 1 and tiers["disk_writes_paused"]
            assert server.serve.wait_for_line("the disk is full", 10), server.serve.output
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_disk_tier_survives_a_restart_and_a_worker_killed_mid_offload(tmp_path):
    disk = str(tmp_path / "disk")
    flags = ("--kv-disk-cache-gib", "1", "--kv-disk-cache-dir", disk, "--kv-disk-min-frequency", "1")
    server = Server(*flags)
    try:
        reference = [server.complete(p)[0] for p in PROMPTS]  # 0 and 1 are evicted to disk
        assert len(_block_files(disk, PROMPTS[0])) >= 17
        [worker] = server.serve.worker_processes()
        worker.send_signal(signal.SIGKILL)  # writes of PROMPTS[1]'s blocks may still be in flight
    finally:
        server.stop()
    # What a kill mid-write leaves: a temporary file, and (on a crash without fsync) a short file.
    files = _block_files(disk, PROMPTS[0])
    with open(files[-1], "r+b") as f:
        f.truncate(1000)
    with open(files[0] + f".tmp-{uuid.uuid4().hex}", "wb") as f:
        f.write(b"half a block")
    server = Server(*flags)
    try:
        at_start = server.tiers()
        assert at_start["disk_blocks"] >= 16  # announced before any request
        assert at_start["disk_corrupt_blocks"] == 1  # the truncated file, dropped by the scan
        assert not glob.glob(os.path.join(disk, "worker-0", "*", "*.tmp-*"))
        # Every block but the truncated last one comes from disk; that one is recomputed.
        assert server.complete(PROMPTS[0]) == (reference[0], MATCHABLE - 16)
        assert server.tiers()["onboarded_g3_g1"] == MATCHABLE // 16 - 1
    finally:
        server.stop()


def test_node_wide_host_tier_serves_a_prefix_computed_by_another_worker():
    name = f"test-{uuid.uuid4().hex[:12]}"
    server = Server(
        "--workers", "2", "--router", "round-robin", "--kv-host-cache-gib", "0.1", "--kv-host-cache-shared", name,
        "--kv-offload-policy", "write-through",
    )  # fmt: skip
    try:
        workers = server.workers()
        assert len({w["kv_node_tier"] for w in workers}) == 1 and workers[0]["kv_node_tier"].endswith("/" + name)
        first, cached = server.complete(PROMPTS[0])  # computed on one worker, written through to G2
        assert cached == 0
        before = [server.tiers(i) for i in range(2)]
        second, cached = server.complete(PROMPTS[0])  # round-robin: the other worker
        after = [server.tiers(i) for i in range(2)]
        assert second == first and cached == MATCHABLE
        onboarded = [_delta(a, b, "onboarded_g2_g1") for a, b in zip(after, before)]
        assert sorted(onboarded) == [0, MATCHABLE // 16]
        assert all(a["host_shared"] == name for a in after)
    finally:
        server.stop()
        path = f"/dev/shm/tandem-kv-{name}"
        if os.path.exists(path):
            os.unlink(path)


def test_kv_router_sends_a_prompt_back_to_the_worker_that_holds_it_in_host_memory():
    # evict: a block reaches the host tier only when its worker's pool gives it up.
    server = Server("--workers", "2", "--router", "kv", "--kv-host-cache-gib", HOST_GIB, "--kv-offload-policy", "evict")
    try:
        server.complete(PROMPTS[0])
        [first] = [w for w, s in router_status(server.url)["workers"].items() if s["requests_finished"] == 1]
        # Fresh prompts land on either worker (both idle, nothing cached): once one lands on the
        # first worker, PROMPTS[0] leaves that worker's pool for its host tier.
        for seed in range(100, 110):
            server.complete(_prompt(seed))
            if router_status(server.url)["workers"][first]["blocks_by_tier"]["host"] >= 10:
                break
        else:
            pytest.fail("PROMPTS[0] never reached the host tier")
        before = router_status(server.url)
        tokens, cached = server.complete(PROMPTS[0])
        after = router_status(server.url)
        served = [
            w for w, s in after["workers"].items() if s["requests_finished"] > before["workers"][w]["requests_finished"]
        ]
        assert served == [first]  # its host blocks earned it the request
        assert cached == MATCHABLE
        assert after["host_matched_blocks"] - before["host_matched_blocks"] >= 10
    finally:
        server.stop()

"""The KV tier flags of `tandem worker` per engine: the mocker models them, a vLLM worker's host
tier is vLLM's own offloading, and what an engine cannot have is a clear error."""

from __future__ import annotations

import pytest

from tandem.cli import worker_cmd
from tandem.cli.main import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["worker", *argv])


def test_the_mocker_sizes_its_modeled_tiers_from_the_flags():
    args = parse(
        "--engine", "mocker", "--kv-host-cache-gib", "1", "--kv-disk-cache-gib", "2", "--kv-bytes-per-token", "1024",
        "--kv-host-cache-shared", "node", "--mocker-tier-gbs", "10", "2", "--kv-offload-policy", "evict",
    )  # fmt: skip
    tiers = worker_cmd._mocker_tiers(args)
    block_bytes = 1024 * 16
    assert (tiers.num_host_blocks, tiers.num_disk_blocks) == (2**30 // block_bytes, 2 * 2**30 // block_bytes)
    assert (tiers.host_shared, tiers.host_onboard_gbs, tiers.disk_onboard_gbs) == ("node", 10.0, 2.0)
    assert tiers.offload_policy == "evict" and tiers.disk_min_frequency == 2


def test_a_mocker_without_tier_flags_has_no_tiers():
    assert not worker_cmd._mocker_tiers(parse("--engine", "mocker")).enabled


def test_a_vllm_workers_host_tier_is_vllms_own_offloading():
    pytest.importorskip("vllm")
    config = worker_cmd.vllm_config_from_args(parse("--engine", "vllm", "--kv-host-cache-gib", "4"), "/models/m")
    assert config.extra["kv_offloading_size"] == 4.0
    explicit = parse("--engine", "vllm", "--kv-host-cache-gib", "4", "--vllm-arg", "kv_offloading_size=2")
    assert worker_cmd.vllm_config_from_args(explicit, "/models/m").extra["kv_offloading_size"] == 2


@pytest.mark.parametrize(
    "flags", [("--kv-disk-cache-gib", "1", "--kv-disk-cache-dir", "/tmp/x"), ("--kv-host-cache-shared", "n")]
)
def test_a_vllm_worker_refuses_tandems_disk_and_node_wide_tiers(flags):
    with pytest.raises(SystemExit, match="vLLM's own offloading"):
        worker_cmd.run(parse("--engine", "vllm", *flags))

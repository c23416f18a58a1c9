"""Engine flags shared by every command that hosts an engine (chat, worker, serve).

``--block-size``, ``--kv-cache-gib``, ``--max-num-batched-tokens`` and ``--max-num-seqs`` default
to None here so that the vllm engine can tell a value the user chose from a default (it then
keeps vLLM's own); the builtin engine and the mocker fill in Tandem's defaults (the ``DEFAULT_*``
constants)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tandem.protocols.block_hash import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:  # keep `tandem --help` from importing torch
    from tandem.engine.config import EngineConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_KV_CACHE_GIB = 1.0
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 128


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, help="model-cache name, HF directory or .gguf file (default: %(default)s)"
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and KV cache dtype; auto = bfloat16 on a CPU with AVX512-BF16/AMX and on "
        "CUDA, float32 on other CPUs (default: %(default)s)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    group.add_argument(
        "--kv-cache-gib",
        type=float,
        help=f"KV cache budget (default: {DEFAULT_KV_CACHE_GIB}; vllm engine: vLLM's own sizing)",
    )
    group.add_argument(
        "--num-kv-blocks",
        type=int,
        help="exact KV pool size in blocks, overriding --kv-cache-gib (default: from --kv-cache-gib)",
    )
    group.add_argument(
        "--block-size",
        type=int,
        help=f"tokens per KV block (default: {DEFAULT_BLOCK_SIZE}; vllm engine: vLLM's platform default, "
        "a multiple of 32 on its CPU build)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help=f"token budget of one step (default: {DEFAULT_MAX_NUM_BATCHED_TOKENS}; vllm engine: vLLM's)",
    )
    group.add_argument(
        "--max-num-seqs", type=int, help=f"most running requests (default: {DEFAULT_MAX_NUM_SEQS}; vllm engine: vLLM's)"
    )
    group.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    add_kv_tier_args(parser)


def add_kv_tier_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "KV tiers (below the engine's KV pool; the mocker models them; on vllm, --kv-host-cache-gib is "
        "vLLM's kv_offloading_size)"
    )
    group.add_argument(
        "--kv-host-cache-gib",
        type=float,
        default=0.0,
        help="host-memory tier (G2) for blocks evicted from the pool; with --kv-host-cache-shared, "
        "the size of the node-wide tier if this worker creates it; 0 = none (default: %(default)s)",
    )
    group.add_argument(
        "--kv-host-cache-shared",
        metavar="NAME",
        help="share the host tier with every worker of this machine that gives the same NAME "
        "(a segment /dev/shm/tandem-kv-NAME; remove it with `rm` when no worker uses it) (default: none, private)",
    )
    group.add_argument(
        "--kv-disk-cache-gib",
        type=float,
        default=0.0,
        help="local-disk tier (G3) capacity; 0 = none (default: %(default)s)",
    )
    group.add_argument(
        "--kv-disk-cache-dir",
        help="directory of the disk tier's block files, one per worker; blocks found there at start "
        "are served again; `tandem serve` gives each worker a subdirectory (default: none; required with "
        "--kv-disk-cache-gib)",
    )
    group.add_argument(
        "--kv-offload-policy",
        default="write-through",
        choices=("write-through", "evict"),
        help="write-through: copy a block to the host tier at the end of the step that computed it; "
        "evict: when the pool evicts it (default: %(default)s)",
    )
    group.add_argument(
        "--kv-disk-min-frequency",
        type=int,
        default=2,
        help="write a block leaving the host tier to disk only if it was used this often (default: %(default)s)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The builtin engine's config; a bad combination of flags exits with a clear error."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.kv_tiers.config import KvTierConfig

    try:
        tiers = KvTierConfig(
            host_cache_gib=args.kv_host_cache_gib,
            host_cache_shared=args.kv_host_cache_shared,
            disk_cache_gib=args.kv_disk_cache_gib,
            disk_cache_dir=args.kv_disk_cache_dir,
            offload_policy=args.kv_offload_policy,
            disk_min_frequency=args.kv_disk_min_frequency,
        )
        return EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            num_threads=args.threads,
            kv_cache_memory_gib=args.kv_cache_gib if args.kv_cache_gib is not None else DEFAULT_KV_CACHE_GIB,
            num_kv_blocks=args.num_kv_blocks,
            block_size=args.block_size or DEFAULT_BLOCK_SIZE,
            max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            max_num_seqs=args.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
            max_model_len=args.max_model_len,
            enable_prefix_caching=not args.no_prefix_caching,
            kv_tiers=tiers,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None

"""The ``trace`` workload: replay a Mooncake-format JSONL trace on its schedule.

Each line is one request::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, ...]}

``timestamp`` is in milliseconds; ``hash_ids`` name the prompt's blocks of ``block_size`` tokens
(512 in the Mooncake traces), so requests that share leading hash ids share a prompt prefix.

Prompts are built as token ids so the sharing is real: hash id ``h`` always becomes the same
``block_size`` random tokens (drawn from a generator seeded by ``(seed, 0, h)``), the prompt is
the concatenation of its blocks cut to ``input_length``, and when the blocks are too short it is
extended with tokens unique to the request (seeded by ``(seed, 1, index)``). Two prompts whose
first ``k`` hash ids are equal then share exactly their first ``k * block_size`` tokens.

:func:`synthesize_trace` and :func:`write_trace` make small synthetic traces for tests and examples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.workloads.random_tokens import DEFAULT_FIRST_TOKEN_ID, DEFAULT_VOCAB_SIZE, check_vocab
from tandem.bench.workloads.request import BenchRequest

MOONCAKE_BLOCK_SIZE = 512
"""Tokens per hash id in the published Mooncake traces."""

WORKLOAD_TAG = 41
"""Mixed into every seed so two workloads with the same --seed never draw the same tokens."""


@dataclass
class TraceEntry:
    """One line of a Mooncake-format trace."""

    timestamp: float
    """Arrival time in milliseconds (any origin)."""
    input_length: int
    """Prompt length in tokens."""
    output_length: int
    """Output length in tokens (the request's ``max_tokens``)."""
    hash_ids: list[int] = field(default_factory=list)
    """Ids of the prompt's blocks, in order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trace_entry_from_dict(obj: Any, where: str = "entry") -> TraceEntry:
    """Validate one decoded trace line; ValueError naming ``where`` and the field otherwise.

    ``timestamp``, ``input_length`` and ``output_length`` are required, ``hash_ids`` defaults to
    ``[]``; other keys are ignored.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("timestamp", "input_length", "output_length"):
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r}")
    timestamp = obj["timestamp"]
    if not (_is_int(timestamp) or isinstance(timestamp, float)) or not math.isfinite(timestamp):
        raise ValueError(f"{where}: 'timestamp' must be a finite number of milliseconds, got {timestamp!r}")
    for key in ("input_length", "output_length"):
        if not _is_int(obj[key]) or obj[key] < 1:
            raise ValueError(f"{where}: {key!r} must be an integer >= 1, got {obj[key]!r}")
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(_is_int(h) and h >= 0 for h in hash_ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of integers >= 0")
    return TraceEntry(
        timestamp=timestamp,
        input_length=obj["input_length"],
        output_length=obj["output_length"],
        hash_ids=list(hash_ids),
    )


def load_trace(path: str | Path) -> list[TraceEntry]:
    """Read a Mooncake-format JSONL trace (blank lines skipped); ValueError with the line number on a bad line."""
    entries: list[TraceEntry] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            entries.append(trace_entry_from_dict(obj, where))
    return entries


def write_trace(entries: Iterable[TraceEntry | dict[str, Any]], path: str | Path) -> None:
    """Write entries (dicts or :class:`TraceEntry`) as JSONL, one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for entry in entries:
            obj = entry.to_dict() if isinstance(entry, TraceEntry) else entry
            f.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


@dataclass
class TraceConfig:
    """How trace entries become token-id prompts and send times."""

    block_size: int = MOONCAKE_BLOCK_SIZE
    """Tokens per hash id (512 for the Mooncake traces)."""
    seed: int = 0
    """Same seed, same tokens for every hash id."""
    time_scale: float = 1.0
    """Multiplies the trace's gaps: 0.5 replays twice as fast, 0 sends everything at once."""
    first_token_id: int = DEFAULT_FIRST_TOKEN_ID
    """Lowest token id drawn."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Token ids are drawn below this."""

    def __post_init__(self) -> None:
        check_vocab(self.first_token_id, self.vocab_size)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (self.time_scale >= 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a finite number >= 0, got {self.time_scale}")


def hash_id_block(hash_id: int, config: TraceConfig) -> np.ndarray:
    """The ``block_size`` tokens hash id ``hash_id`` stands for (the same in every request)."""
    rng = np.random.default_rng([config.seed, WORKLOAD_TAG, 0, hash_id])
    return rng.integers(config.first_token_id, config.vocab_size, size=config.block_size, dtype=np.int64)


def iter_trace_requests(
    entries: Iterable[TraceEntry], config: TraceConfig | None = None, origin_ms: float | None = None
) -> Iterator[BenchRequest]:
    """Like :func:`trace_requests`, built lazily one request at a time (for long traces).

    Times are relative to ``origin_ms``, by default the first entry's timestamp (the earliest
    one in a sorted trace).
    """
    config = config or TraceConfig()
    blocks: dict[int, np.ndarray] = {}
    for index, entry in enumerate(entries):
        if origin_ms is None:
            origin_ms = entry.timestamp
        yield _build(index, entry, origin_ms, config, blocks)


def trace_requests(entries: list[TraceEntry], config: TraceConfig | None = None) -> list[BenchRequest]:
    """One :class:`BenchRequest` per entry, in order: token-id prompt of exactly ``input_length``
    tokens, ``max_tokens = output_length``, ``hash_ids`` copied, and ``timestamp_s`` =
    ``(timestamp - earliest timestamp) / 1000 * time_scale``."""
    if not entries:
        return []
    return list(iter_trace_requests(entries, config, origin_ms=min(e.timestamp for e in entries)))


def _build(
    index: int, entry: TraceEntry, t0: float, config: TraceConfig, blocks: dict[int, np.ndarray]
) -> BenchRequest:
    needed = entry.input_length
    parts: list[np.ndarray] = []
    have = 0
    for h in entry.hash_ids:
        if have >= needed:
            break
        block = blocks.get(h)
        if block is None:
            block = blocks[h] = hash_id_block(h, config)
        parts.append(block)
        have += config.block_size
    if have < needed:
        rng = np.random.default_rng([config.seed, WORKLOAD_TAG, 1, index])
        parts.append(rng.integers(config.first_token_id, config.vocab_size, size=needed - have, dtype=np.int64))
    prompt = np.concatenate(parts)[:needed].tolist()
    return BenchRequest(
        max_tokens=entry.output_length,
        input_tokens=len(prompt),
        prompt=prompt,
        timestamp_s=(entry.timestamp - t0) / 1000.0 * config.time_scale,
        hash_ids=list(entry.hash_ids),
    )


def synthesize_trace(
    num_requests: int = 100,
    rate: float = 1.0,
    num_prefixes: int = 4,
    prefix_blocks: int = 2,
    unique_blocks: int = 2,
    output_length: int = 64,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A small Mooncake-format trace: Poisson arrivals at ``rate`` requests/s starting at 0 ms.

    Each request takes one of ``num_prefixes`` shared prefixes (``prefix_blocks`` hash ids each,
    chosen at random) followed by ``unique_blocks`` hash ids used by no other request, so
    ``input_length = (prefix_blocks + unique_blocks) * block_size``. Prefix ``p`` uses hash ids
    ``p * prefix_blocks ... (p + 1) * prefix_blocks - 1``; unique ids follow. With
    ``num_prefixes = 0`` or ``prefix_blocks = 0`` nothing is shared.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if num_prefixes < 0 or prefix_blocks < 0 or unique_blocks < 0:
        raise ValueError("num_prefixes, prefix_blocks and unique_blocks must be >= 0")
    shared = prefix_blocks if num_prefixes > 0 else 0
    if shared + unique_blocks < 1:
        raise ValueError("every request needs at least one block")
    if output_length < 1 or block_size < 1:
        raise ValueError("output_length and block_size must be >= 1")
    rng = np.random.default_rng(seed)
    next_unique = num_prefixes * prefix_blocks
    t_ms = 0.0
    trace: list[dict[str, Any]] = []
    for i in range(num_requests):
        if i > 0:
            t_ms += float(rng.exponential(1000.0 / rate))
        hash_ids: list[int] = []
        if shared:
            p = int(rng.integers(num_prefixes))
            hash_ids.extend(range(p * prefix_blocks, (p + 1) * prefix_blocks))
        hash_ids.extend(range(next_unique, next_unique + unique_blocks))
        next_unique += unique_blocks
        trace.append(
            {
                "timestamp": round(t_ms, 3),
                "input_length": len(hash_ids) * block_size,
                "output_length": output_length,
                "hash_ids": hash_ids,
            }
        )
    return trace

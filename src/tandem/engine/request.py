"""A request's state inside the engine: its tokens, progress, KV blocks and sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tandem.kernels.block_hash import block_hashes
from tandem.protocols.block_hash import seed_for_salt
from tandem.protocols.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.engine.block_pool import KVBlock


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One generation request.

    Its tokens are ``prompt + output``; ``num_computed_tokens`` of them have KV in the cache.
    Each step computes some of the rest; once all are computed a new token is sampled. After a
    preemption ``num_computed_tokens`` drops to 0 and the whole sequence is recomputed.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_size: int
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: frozenset[int] = frozenset()

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens found in the prefix cache when first scheduled (-1: not scheduled yet)."""
    block_table: list[KVBlock] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Contract sequence hashes of every full block of all_token_ids."""
    num_registered_blocks: int = 0
    """Leading blocks of block_table already published to the prefix cache."""
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    hash_seed: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.hash_seed = seed_for_salt(self.cache_salt)
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            self.update_block_hashes()

    def update_block_hashes(self) -> None:
        """Extend block_hashes to cover every full block (hashes depend on tokens only)."""
        done = len(self.block_hashes)
        start = done * self.block_size
        parent = self.block_hashes[-1] if done else None
        self.block_hashes.extend(
            block_hashes(self.all_token_ids[start:], self.block_size, self.hash_seed, parent_hash=parent)
        )

"""The ``shared-prefix`` workload: N shared system prompts, each followed by a unique question.

Every request's prompt is one of ``num_prefixes`` fixed system prompts of ``prefix_len`` random
tokens, then a question of ``question_len`` random tokens unique to the request (AIPerf's
``--num-prefix-prompts/--prefix-prompt-length``). Different prefixes start with different
tokens, so they never share a KV block; requests on the same prefix share exactly its
``prefix_len`` leading tokens (up to a chance match of the first question token).

Prefixes are drawn from a generator seeded by ``(seed, 0)``; request ``i`` from one seeded by
``(seed, 1, i)``, so the same seed gives the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from tandem.bench.workloads.random_tokens import (
    DEFAULT_FIRST_TOKEN_ID,
    DEFAULT_VOCAB_SIZE,
    check_vocab,
    random_token_ids,
)
from tandem.bench.workloads.request import BenchRequest

WORKLOAD_TAG = 31
"""Mixed into every seed so two workloads with the same --seed never draw the same tokens."""


@dataclass
class SharedPrefixConfig:
    """Prefix-cache traffic: a small pool of long shared system prompts."""

    num_prefixes: int = 4
    """How many distinct system prompts."""
    prefix_len: int = 1000
    """Tokens in each system prompt."""
    question_len: int = 50
    """Tokens in each request's unique question."""
    output_len: int = 100
    """``max_tokens`` of every request."""
    num_requests: int = 100
    """How many requests to build."""
    seed: int = 0
    """Same seed, same prefixes, questions and assignment."""
    assignment: Literal["round-robin", "random"] = "round-robin"
    """Which prefix request ``i`` gets: ``i % num_prefixes``, or uniformly at random (seeded)."""
    first_token_id: int = DEFAULT_FIRST_TOKEN_ID
    """Lowest token id drawn."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Token ids are drawn below this."""

    def __post_init__(self) -> None:
        check_vocab(self.first_token_id, self.vocab_size)
        if self.num_prefixes < 1:
            raise ValueError(f"num_prefixes must be >= 1, got {self.num_prefixes}")
        if self.num_prefixes > self.vocab_size - self.first_token_id:
            raise ValueError("num_prefixes exceeds the token range (prefixes need distinct first tokens)")
        if self.prefix_len < 0 or self.question_len < 0 or self.prefix_len + self.question_len < 1:
            raise ValueError("prefix_len and question_len must be >= 0 with a non-empty prompt")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.assignment not in ("round-robin", "random"):
            raise ValueError(f"assignment must be 'round-robin' or 'random', got {self.assignment!r}")


def shared_prefixes(config: SharedPrefixConfig) -> list[list[int]]:
    """The ``num_prefixes`` system prompts (token ids), each with a distinct first token."""
    if config.prefix_len == 0:
        return [[] for _ in range(config.num_prefixes)]
    rng = np.random.default_rng([config.seed, WORKLOAD_TAG, 0])
    firsts = rng.choice(config.vocab_size - config.first_token_id, size=config.num_prefixes, replace=False)
    return [
        [config.first_token_id + int(first)]
        + random_token_ids(rng, config.prefix_len - 1, config.first_token_id, config.vocab_size)
        for first in firsts
    ]


def shared_prefix_requests(config: SharedPrefixConfig) -> list[BenchRequest]:
    """``config.num_requests`` requests: a shared prefix followed by a unique question."""
    prefixes = shared_prefixes(config)
    requests: list[BenchRequest] = []
    for i in range(config.num_requests):
        rng = np.random.default_rng([config.seed, WORKLOAD_TAG, 1, i])
        which = int(rng.integers(config.num_prefixes)) if config.assignment == "random" else i % config.num_prefixes
        question = random_token_ids(rng, config.question_len, config.first_token_id, config.vocab_size)
        prompt = prefixes[which] + question
        requests.append(BenchRequest(max_tokens=config.output_len, input_tokens=len(prompt), prompt=prompt))
    return requests

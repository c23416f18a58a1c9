"""The ``random`` workload: random-token prompts with normally distributed lengths.

Prompts are token ids, so their lengths are exact. Tokens are drawn uniformly from
``[first_token_id, vocab_size)``; the defaults (1000, 32000) stay clear of the special ids at the
bottom of common vocabularies and inside the smallest common vocabulary sizes.

Request ``i`` is drawn from its own generator seeded by ``(seed, i)``, so the same seed gives the
same requests, and asking for more requests only appends to the list. The token helpers here
(:func:`random_token_ids`, :func:`check_vocab`) are shared by the other workloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.bench.workloads.request import BenchRequest

WORKLOAD_TAG = 11
"""Mixed into every seed so two workloads with the same --seed never draw the same tokens."""


DEFAULT_FIRST_TOKEN_ID = 1000
"""Lowest token id drawn: above the special/control ids of common tokenizers."""
DEFAULT_VOCAB_SIZE = 32000
"""Token ids are drawn below this: inside the vocabularies of common models (Llama 2 has 32000)."""


def check_vocab(first_token_id: int, vocab_size: int) -> None:
    """Raise ValueError unless ``0 <= first_token_id < vocab_size``."""
    if not 0 <= first_token_id < vocab_size:
        raise ValueError(f"token range [first_token_id={first_token_id}, vocab_size={vocab_size}) is empty or negative")


def random_token_ids(rng: np.random.Generator, n: int, first_token_id: int, vocab_size: int) -> list[int]:
    """``n`` token ids drawn uniformly from ``[first_token_id, vocab_size)``."""
    ids: list[int] = rng.integers(first_token_id, vocab_size, size=n).tolist()
    return ids


def sample_length(rng: np.random.Generator, mean: int, stddev: float) -> int:
    """A length from N(mean, stddev) rounded to an int and clamped to >= 1 (exactly ``mean`` when stddev is 0)."""
    if stddev <= 0:
        return max(1, mean)
    return max(1, round(rng.normal(mean, stddev)))


@dataclass
class RandomWorkloadConfig:
    """Fixed-ISL/OSL traffic with optional spread (AIPerf's ``--isl/--isl-stddev/--osl/--osl-stddev``)."""

    input_len: int = 550
    """Mean prompt length in tokens (AIPerf's default ISL)."""
    input_len_stddev: float = 0
    """Standard deviation of the prompt length; 0 gives exactly ``input_len``."""
    output_len: int = 150
    """Mean ``max_tokens``."""
    output_len_stddev: float = 0
    """Standard deviation of ``max_tokens``; 0 gives exactly ``output_len``."""
    num_requests: int = 100
    """How many requests to build."""
    seed: int = 0
    """Same seed, same requests."""
    first_token_id: int = DEFAULT_FIRST_TOKEN_ID
    """Lowest token id drawn."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Token ids are drawn below this."""

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input_len and output_len must be >= 1, got {self.input_len}, {self.output_len}")
        if self.input_len_stddev < 0 or self.output_len_stddev < 0:
            raise ValueError("length standard deviations must be >= 0")
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_vocab(self.first_token_id, self.vocab_size)


def random_requests(config: RandomWorkloadConfig) -> list[BenchRequest]:
    """``config.num_requests`` requests with random-token prompts and sampled lengths."""
    requests: list[BenchRequest] = []
    for i in range(config.num_requests):
        rng = np.random.default_rng([config.seed, WORKLOAD_TAG, i])
        input_len = sample_length(rng, config.input_len, config.input_len_stddev)
        output_len = sample_length(rng, config.output_len, config.output_len_stddev)
        prompt = random_token_ids(rng, input_len, config.first_token_id, config.vocab_size)
        requests.append(BenchRequest(max_tokens=output_len, input_tokens=len(prompt), prompt=prompt))
    return requests

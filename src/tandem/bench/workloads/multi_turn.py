"""The ``multi-turn`` workload: production-stack's multi-round QA, on token-id prompts.

Simulated users each hold a chat of ``num_rounds`` turns. A user's first prompt is

    system tokens (``system_prompt_len``, the same for every user)
    + history tokens (``user_history_len``, unique to the user)
    + question 0 (``question_len`` tokens)

and every later turn resends the whole conversation: the previous prompt, the answer the server
gave (its token ids) and a new question. So each prompt is a strict prefix of the next one and
prefix reuse grows every round, as in ``benchmarks/multi-round-qa/multi-round-qa.py``.

Pacing (the load generator's job; the numbers are here): the overall rate is ``qps``, so a user
sends a turn every :func:`user_gap_s` = ``num_users / qps`` seconds, a session lasts
:func:`session_duration_s` and a new user joins every :func:`user_join_interval_s`.

Seeding: system tokens from ``(seed, 0)``, user ``u``'s history from ``(seed, 1, u)``, its
question for round ``k`` from ``(seed, 2, u, k)``; the same seed gives the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.bench.workloads.random_tokens import (
    DEFAULT_FIRST_TOKEN_ID,
    DEFAULT_VOCAB_SIZE,
    check_vocab,
    random_token_ids,
    sample_length,
)
from tandem.bench.workloads.request import BenchRequest

WORKLOAD_TAG = 21
"""Mixed into every seed so two workloads with the same --seed never draw the same tokens."""


@dataclass
class MultiTurnConfig:
    """Multi-round QA (defaults: the CPU-scale shape of research anchors §5; production-stack's
    README example is 10 users, 5 rounds, qps 0.5, system 1000, history 2000, answer 100)."""

    num_users: int = 4
    """Concurrent simulated users."""
    num_rounds: int = 5
    """Turns per user."""
    system_prompt_len: int = 200
    """Tokens of the system prompt every user shares."""
    user_history_len: int = 400
    """Tokens of per-user context, unique to each user."""
    answer_len: int = 32
    """``max_tokens`` of every turn."""
    qps: float = 1.0
    """Overall request rate across all users."""
    question_len: int = 20
    """Tokens of each round's question."""
    seed: int = 0
    """Same seed, same prompts."""
    num_system_prompts: int = 1
    """Distinct shared system prompts; user ``i`` gets prompt ``i % num_system_prompts``."""
    answer_len_stddev: float = 0.0
    """Spread of ``max_tokens`` per turn (normal, clamped to >= 1); 0 = every answer ``answer_len``."""
    first_token_id: int = DEFAULT_FIRST_TOKEN_ID
    """Lowest token id drawn."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Token ids are drawn below this."""

    def __post_init__(self) -> None:
        check_vocab(self.first_token_id, self.vocab_size)
        if self.num_users < 1 or self.num_rounds < 1:
            raise ValueError(f"num_users and num_rounds must be >= 1, got {self.num_users}, {self.num_rounds}")
        if min(self.system_prompt_len, self.user_history_len, self.question_len) < 0:
            raise ValueError("system_prompt_len, user_history_len and question_len must be >= 0")
        if self.system_prompt_len + self.user_history_len + self.question_len < 1:
            raise ValueError("the first prompt would be empty")
        if self.num_system_prompts < 1 or self.answer_len_stddev < 0:
            raise ValueError("num_system_prompts must be >= 1 and answer_len_stddev >= 0")
        if self.answer_len < 1:
            raise ValueError(f"answer_len must be >= 1, got {self.answer_len}")
        if not self.qps > 0:
            raise ValueError(f"qps must be > 0, got {self.qps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def user_gap_s(config: MultiTurnConfig) -> float:
    """Seconds between two turns of one user: ``num_users / qps``."""
    return config.num_users / config.qps


def session_duration_s(config: MultiTurnConfig) -> float:
    """Seconds from a user's first turn to its last: ``user_gap_s * (num_rounds - 1)``."""
    return user_gap_s(config) * (config.num_rounds - 1)


def user_join_interval_s(config: MultiTurnConfig) -> float:
    """Seconds between two new users joining, which keeps ``num_users`` active: ``session_duration_s / num_users``."""
    return session_duration_s(config) / config.num_users


def system_prompt_tokens(config: MultiTurnConfig, index: int = 0) -> list[int]:
    """Shared system prompt number ``index`` (of ``num_system_prompts``)."""
    rng = np.random.default_rng([config.seed, WORKLOAD_TAG, 0] + ([index] if index else []))
    return random_token_ids(rng, config.system_prompt_len, config.first_token_id, config.vocab_size)


class UserSession:
    """One simulated user's conversation; builds each turn's full prompt."""

    def __init__(self, config: MultiTurnConfig, user_index: int, system_tokens: list[int] | None = None):
        if user_index < 0:
            raise ValueError(f"user_index must be >= 0, got {user_index}")
        self.config = config
        self.user_index = user_index
        self.session_id = f"user-{user_index}"
        if system_tokens is None:
            system_tokens = system_prompt_tokens(config, user_index % config.num_system_prompts)
        self._system = system_tokens
        self._prompt: list[int] | None = None
        self._turn = -1

    @property
    def turn(self) -> int:
        """The 0-based round of the last request built (-1 before the first)."""
        return self._turn

    @property
    def done(self) -> bool:
        """True once all ``num_rounds`` turns have been built."""
        return self._turn >= self.config.num_rounds - 1

    def _question(self, round_index: int) -> list[int]:
        rng = np.random.default_rng([self.config.seed, WORKLOAD_TAG, 2, self.user_index, round_index])
        return random_token_ids(rng, self.config.question_len, self.config.first_token_id, self.config.vocab_size)

    def _request(self) -> BenchRequest:
        assert self._prompt is not None
        return BenchRequest(
            max_tokens=self._answer_len(),
            input_tokens=len(self._prompt),
            prompt=list(self._prompt),
            session_id=self.session_id,
            turn=self._turn,
        )

    def _answer_len(self) -> int:
        cfg = self.config
        if not cfg.answer_len_stddev:
            return cfg.answer_len
        rng = np.random.default_rng([cfg.seed, WORKLOAD_TAG, 3, self.user_index, self._turn])
        return sample_length(rng, cfg.answer_len, cfg.answer_len_stddev)

    def first_request(self) -> BenchRequest:
        """Turn 0: system + user history + the first question. Calling it again restarts the session."""
        rng = np.random.default_rng([self.config.seed, WORKLOAD_TAG, 1, self.user_index])
        cfg = self.config
        history = random_token_ids(rng, cfg.user_history_len, cfg.first_token_id, cfg.vocab_size)
        self._turn = 0
        self._prompt = self._system + history + self._question(0)
        return self._request()

    def next_request(self, answer_token_ids: list[int]) -> BenchRequest | None:
        """The next turn: the previous prompt + the answer it got + a new question; None after ``num_rounds``."""
        if self._prompt is None:
            raise RuntimeError("next_request() before first_request()")
        if self.done:
            return None
        self._turn += 1
        self._prompt = self._prompt + [int(t) for t in answer_token_ids] + self._question(self._turn)
        return self._request()


def new_session(config: MultiTurnConfig, user_index: int) -> UserSession:
    """A fresh session for user ``user_index`` (users keep joining, so the index is unbounded)."""
    return UserSession(config, user_index)

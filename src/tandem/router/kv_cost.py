"""The KV-aware routing cost and worker selection (DESIGN.md §4 "Cost (KV policy)").

For each candidate worker::

    prefill_blocks = (active_prefill_tokens + new_prompt_tokens) / block_size
    cost = prefill_load_scale * max(0, prefill_blocks - overlap_credit * cached_blocks)
           + active_decode_blocks

``active_prefill_tokens`` and ``active_decode_blocks`` come from :class:`~tandem.router.active_load.ActiveLoad`
(requests already routed there), ``cached_blocks`` from the KV indexer (how many leading blocks of
the new prompt the worker already holds). Lower is better.

Selection: temperature 0 picks the cheapest worker, ties broken uniformly at random; temperature
T > 0 samples from a softmax over min-max normalised costs,
``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``, uniform when all costs are equal (this is
Dynamo's ``softmax_sample``). The functions here are pure; randomness comes from the ``rng``
argument so that tests and simulations can seed it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Costs within this relative distance of the minimum count as tied (guards float noise such as
# 0.1 + 0.2 != 0.3 from making tie-breaking depend on evaluation order).
_TIE_REL_TOL = 1e-9


@dataclass(frozen=True, slots=True)
class KvCostConfig:
    """Knobs of the KV-aware cost and selection. All default to Dynamo's defaults."""

    overlap_credit: float = 1.0
    """Blocks of prefill credit per cached prompt block. 1.0 = a cached block costs nothing to
    prefill; 0 ignores the cache entirely (pure load balancing)."""
    prefill_load_scale: float = 1.0
    """Weight of the (credited) prefill load relative to decode blocks. > 1 favours TTFT (cache
    hits and idle prefill), < 1 favours spreading decode load (ITL)."""
    temperature: float = 0.0
    """0 = always the cheapest worker (random among ties); > 0 = sample from a softmax over
    min-max normalised costs; larger spreads load more evenly, regardless of cost."""
    seed: int | None = None
    """Seed of the selection RNG (ties and sampling); None = nondeterministic."""

    def __post_init__(self) -> None:
        for name in ("overlap_credit", "prefill_load_scale", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def make_rng(self) -> random.Random:
        """A fresh RNG for :func:`select_worker`, seeded with :attr:`seed`."""
        return random.Random(self.seed)


def worker_cost(active_prefill_tokens: int, new_prompt_tokens: int, cached_blocks: int,
                active_decode_blocks: int, block_size: int, config: KvCostConfig) -> float:
    """Cost of sending a prompt of ``new_prompt_tokens`` tokens to one worker (DESIGN.md §4).

    ``cached_blocks`` is how many of the prompt's blocks the worker already holds (tiered hits may
    pass a fractional, partially credited count). Lower is better; never negative.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    prefill_blocks = (active_prefill_tokens + new_prompt_tokens) / block_size
    credited = max(0.0, prefill_blocks - config.overlap_credit * cached_blocks)
    return config.prefill_load_scale * credited + active_decode_blocks


def softmax_probabilities(costs: dict[str, float], temperature: float) -> dict[str, float]:
    """Selection probability of each worker under :func:`select_worker`.

    T > 0: ``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``, uniform if all costs are equal.
    T = 0: uniform over the cheapest workers (ties), 0 for the others.
    """
    _check(costs, temperature)
    c_min = min(costs.values())
    c_max = max(costs.values())
    if temperature == 0 or c_max - c_min <= _tie_tol(c_min):
        tied = [name for name, cost in costs.items() if cost - c_min <= _tie_tol(c_min)]
        share = 1.0 / len(tied)
        return {name: (share if name in tied else 0.0) for name in costs}
    scale = (c_max - c_min) * temperature
    # Exponents lie in [-1/T, 0]: no overflow; the cheapest worker has weight 1, so no 0/0.
    weights = {name: math.exp(-(cost - c_min) / scale) for name, cost in costs.items()}
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def select_worker(costs: dict[str, float], temperature: float, rng: random.Random) -> str:
    """Pick a worker id from ``costs`` (worker id → cost, non-empty).

    T = 0: the argmin, ties broken uniformly at random with ``rng``. T > 0: a draw from
    :func:`softmax_probabilities`. Workers are considered in sorted-id order, so a seeded ``rng``
    gives the same picks whatever the dict's insertion order.
    """
    _check(costs, temperature)
    if temperature == 0:
        c_min = min(costs.values())
        tol = _tie_tol(c_min)
        tied = sorted(name for name, cost in costs.items() if cost - c_min <= tol)
        return tied[0] if len(tied) == 1 else rng.choice(tied)
    probs = softmax_probabilities(costs, temperature)
    names = sorted(probs)
    draw = rng.random()
    cumulative = 0.0
    for name in names:
        cumulative += probs[name]
        if draw < cumulative:
            return name
    # Rounding left the cumulative sum a hair below 1: fall back to the last worker with weight.
    return next(name for name in reversed(names) if probs[name] > 0)


def _tie_tol(c_min: float) -> float:
    return _TIE_REL_TOL * max(1.0, abs(c_min))


def _check(costs: dict[str, float], temperature: float) -> None:
    if not costs:
        raise ValueError("no candidate workers to select from")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    for name, cost in costs.items():
        if not math.isfinite(cost):
            raise ValueError(f"cost of worker {name!r} is not finite: {cost!r}")

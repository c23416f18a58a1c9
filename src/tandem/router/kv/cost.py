"""The KV-aware routing cost and worker selection.

For each candidate worker::

    prefill_blocks = (active_prefill_tokens + new_prompt_tokens) / block_size
    cost = prefill_load_scale * max(0, prefill_blocks - overlap_credit * cached_blocks)
           + active_decode_blocks

``active_prefill_tokens`` and ``active_decode_blocks`` come from :class:`~tandem.router.kv.active_load.ActiveLoad`
(requests already routed there), ``cached_blocks`` from the KV indexer: the leading blocks of the
new prompt the worker already holds, each weighted by the best tier holding it (device 1,
``host_credit`` for host memory, ``disk_credit`` for disk: :func:`tier_credits`; Dynamo's
defaults). Lower is better.

Selection: temperature 0 picks the cheapest worker, ties broken uniformly at random; temperature
T > 0 samples from a softmax over min-max normalised costs,
``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``, uniform when all costs are equal (this is
Dynamo's ``softmax_sample``). The functions here are pure; randomness comes from the ``rng``
argument so that tests and simulations can seed it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.router.kv.tiers import TieredMatch

DEFAULT_PREFILL_LOAD_SCALE = 4.0
"""Tandem's default weight of prefill blocks against decode blocks. Dynamo defaults to 1.0; on
the multi-turn benchmark (benchmarks/kv_routing_quality.py, docs/benchmarks.md) 1.0 let the
decode blocks of a worker's running conversations outweigh a 1,000-token cached prefix, so new
users were sent away from their system prompt: 75% prefix hits and TTFT p90 only 1.2× under
round-robin's, against 85.6% (the pooled-cache oracle's) and 3.2× at 4.0."""

# Costs within this relative distance of the minimum count as tied (guards float noise such as
# 0.1 + 0.2 != 0.3 from making tie-breaking depend on evaluation order).
_TIE_REL_TOL = 1e-9


@dataclass(frozen=True, slots=True)
class KvCostConfig:
    """Knobs of the KV-aware cost and selection. Dynamo's defaults, except ``prefill_load_scale``
    (:data:`DEFAULT_PREFILL_LOAD_SCALE`)."""

    overlap_credit: float = 1.0
    """Blocks of prefill credit per cached prompt block. 1.0 = a cached block costs nothing to
    prefill; 0 ignores the cache entirely (pure load balancing)."""
    prefill_load_scale: float = DEFAULT_PREFILL_LOAD_SCALE
    """Weight of the (credited) prefill load relative to decode blocks. Higher favours TTFT
    (cache hits and idle prefill), lower favours spreading decode load (ITL). Dynamo: 1.0."""
    host_credit: float = 0.75
    """Weight of a prompt block held only in the worker's host memory tier (G2; a node-wide one
    included) against one in its own pool (1): onboarding it is a copy, not a prefill. Dynamo: 0.75."""
    disk_credit: float = 0.25
    """Weight of a prompt block held only in the worker's disk tier (G3; read back while the
    request waits). Dynamo: 0.25."""
    temperature: float = 0.0
    """0 = always the cheapest worker (random among ties); > 0 = sample from a softmax over
    min-max normalised costs; larger spreads load more evenly, regardless of cost."""
    seed: int | None = None
    """Seed of the selection RNG (ties and sampling); None = nondeterministic."""

    def __post_init__(self) -> None:
        for name in ("overlap_credit", "prefill_load_scale", "host_credit", "disk_credit", "temperature"):
            check_weight(name, getattr(self, name))

    def make_rng(self) -> random.Random:
        """A fresh RNG for :func:`select_worker`, seeded with :attr:`seed`."""
        return random.Random(self.seed)


def check_weight(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def tier_credits(matches: Mapping[str, TieredMatch], config: KvCostConfig) -> dict[str, float]:
    """Each worker's cached blocks for :func:`worker_costs`, weighted by tier: device blocks 1,
    host blocks ``host_credit``, disk blocks ``disk_credit``."""
    host, disk = config.host_credit, config.disk_credit
    by_match: dict[TieredMatch, float] = {}  # workers with equal matches (most of them) share one
    credits = {}
    for worker, match in matches.items():
        credit = by_match.get(match)
        if credit is None:
            credit = by_match[match] = match.credit(host, disk)
        credits[worker] = credit
    return credits


def worker_cost(
    active_prefill_tokens: int,
    new_prompt_tokens: int,
    cached_blocks: float,
    active_decode_blocks: int,
    block_size: int,
    config: KvCostConfig,
) -> float:
    """Cost of sending a prompt of ``new_prompt_tokens`` tokens to one worker.

    ``cached_blocks`` is how many of the prompt's blocks the worker already holds (tiered hits
    pass a fractional, partially credited count: :func:`tier_credits`). Lower is better; never
    negative.
    """
    return worker_costs(
        {"": (active_prefill_tokens, active_decode_blocks)}, new_prompt_tokens, {"": cached_blocks}, block_size, config
    )[""]


def worker_costs(
    loads: dict[str, tuple[int, int]],
    new_prompt_tokens: int,
    matches: Mapping[str, float],
    block_size: int,
    config: KvCostConfig,
) -> dict[str, float]:
    """:func:`worker_cost` of every worker in ``loads`` (worker → (active prefill tokens, active
    decode blocks)); ``matches`` gives cached (or tier-credited) blocks (absent = 0). One loop with the constants
    hoisted: the router runs this for every candidate of every request."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    scale, credit, get = config.prefill_load_scale, config.overlap_credit, matches.get
    costs = {}
    for wid, (prefill, decode) in loads.items():
        credited = (prefill + new_prompt_tokens) / block_size - credit * get(wid, 0)
        costs[wid] = scale * (credited if credited > 0.0 else 0.0) + decode
    return costs


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

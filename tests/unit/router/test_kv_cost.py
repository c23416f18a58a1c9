"""The KV routing cost (DESIGN.md §4) and worker selection with temperature."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from tandem.router.kv.cost import (
    DEFAULT_PREFILL_LOAD_SCALE,
    KvCostConfig,
    select_worker,
    softmax_probabilities,
    worker_cost,
    worker_costs,
)

BS = 16


def dynamo(**overrides: float) -> KvCostConfig:
    """A cost config with Dynamo's defaults (prefill_load_scale 1.0, Tandem's default is 4.0)."""
    return KvCostConfig(**{"prefill_load_scale": 1.0, **overrides})


def test_tandem_default_weights_prefill_four_times_dynamos():
    assert KvCostConfig().prefill_load_scale == DEFAULT_PREFILL_LOAD_SCALE == 4.0
    # The worked example's W2 under Tandem's default: 4 * (10 - 5) + 5.
    assert worker_cost(0, 160, 5, 5, BS, KvCostConfig()) == 25.0


def cost(
    prefill_blocks: float,
    cached_blocks: float,
    decode_blocks: int,
    config: KvCostConfig | None = None,
    active_prefill_tokens: int = 0,
) -> float:
    """Cost with the new prompt given in blocks (the prompt is prefill_blocks * BS tokens)."""
    new_tokens = int(prefill_blocks * BS) - active_prefill_tokens
    return worker_cost(active_prefill_tokens, new_tokens, cached_blocks, decode_blocks, BS, config or dynamo())


def test_dynamo_worked_example():
    # router-design.md: W1 (10 prefill blocks, 2 cached, 10 decode) = 18, W2 (10, 5, 5) = 10,
    # W3 (10, 8, 9) = 11 -> W2. The prompt is 160 tokens = 10 blocks of 16.
    costs = {
        "w1": worker_cost(0, 160, 2, 10, BS, dynamo()),
        "w2": worker_cost(0, 160, 5, 5, BS, dynamo()),
        "w3": worker_cost(0, 160, 8, 9, BS, dynamo()),
    }
    assert costs == {"w1": 18.0, "w2": 10.0, "w3": 11.0}
    for seed in range(20):
        assert select_worker(costs, 0.0, random.Random(seed)) == "w2"
    # The same numbers with block_size 1 (Dynamo's example counts in blocks).
    assert worker_cost(0, 10, 2, 10, 1, dynamo()) == 18.0


def test_worker_costs_scores_every_worker_like_worker_cost():
    # The router's batched form: the worked example in one call, absent matches counting as 0.
    loads = {"w1": (0, 10), "w2": (0, 5), "w3": (0, 9), "w4": (48, 0)}
    costs = worker_costs(loads, 160, {"w1": 2, "w2": 5, "w3": 8}, BS, dynamo())
    assert costs == {"w1": 18.0, "w2": 10.0, "w3": 11.0, "w4": 13.0}
    config = dynamo(overlap_credit=0.5, prefill_load_scale=3.0)
    assert worker_costs(loads, 160, {"w2": 5}, BS, config)["w2"] == worker_cost(0, 160, 5, 5, BS, config) == 27.5


def test_active_prefill_tokens_add_to_the_new_prompt():
    # 96 tokens already prefilling + 64 new = 160 tokens = 10 blocks; 2 cached; 10 decode -> 18.
    assert worker_cost(96, 64, 2, 10, BS, dynamo()) == 18.0
    # Partial blocks count fractionally: 8 tokens = half a block.
    assert worker_cost(0, 8, 0, 0, BS, dynamo()) == 0.5


def test_overlap_credit_scales_cached_blocks():
    assert cost(10, 4, 3, dynamo(overlap_credit=0.5)) == 10 - 2 + 3
    assert cost(10, 4, 3, dynamo(overlap_credit=0.0)) == 10 + 3  # cache ignored
    assert cost(10, 4, 3, dynamo(overlap_credit=2.0)) == 10 - 8 + 3


def test_prefill_load_scale_weights_prefill_not_decode():
    assert cost(10, 4, 3, dynamo(prefill_load_scale=2.0)) == 2 * (10 - 4) + 3
    assert cost(10, 4, 3, dynamo(prefill_load_scale=0.0)) == 3
    assert cost(10, 4, 3, dynamo(prefill_load_scale=0.5, overlap_credit=0.5)) == 0.5 * (10 - 2) + 3


def test_credit_is_clamped_at_zero():
    # More credit than prefill work: the prefill term is 0, not negative.
    assert cost(4, 10, 7) == 7.0
    assert cost(4, 4, 7, dynamo(overlap_credit=3.0)) == 7.0
    assert cost(0, 5, 0) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="overlap_credit"):
        KvCostConfig(overlap_credit=-1)
    with pytest.raises(ValueError, match="temperature"):
        KvCostConfig(temperature=math.nan)
    with pytest.raises(ValueError, match="prefill_load_scale"):
        KvCostConfig(prefill_load_scale=math.inf)
    config = KvCostConfig(temperature=0.5, seed=7)
    assert config.make_rng().random() == random.Random(7).random()


def test_temperature_zero_is_argmin():
    rng = random.Random(0)
    assert select_worker({"a": 3.0, "b": 1.0, "c": 2.0}, 0.0, rng) == "b"
    assert select_worker({"only": 42.0}, 0.0, rng) == "only"
    assert select_worker({"a": -1.0, "b": 0.0}, 0.0, rng) == "a"


def test_ties_at_temperature_zero_are_broken_at_random():
    costs = {"a": 5.0, "b": 2.0, "c": 2.0, "d": 9.0}
    picks = Counter(select_worker(costs, 0.0, random.Random(seed)) for seed in range(400))
    assert set(picks) == {"b", "c"}  # both tied workers chosen, never a costlier one
    assert 120 < picks["b"] < 280
    # Float noise does not break a tie: 0.1 + 0.2 vs 0.3.
    noisy = {"x": 0.1 + 0.2, "y": 0.3}
    assert {select_worker(noisy, 0.0, random.Random(s)) for s in range(100)} == {"x", "y"}


def test_seeded_selection_is_reproducible_and_order_independent():
    costs = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 3.0}
    reordered = dict(reversed(list(costs.items())))
    for temperature in (0.0, 0.7):
        rng1, rng2 = random.Random(3), random.Random(3)
        picks = [select_worker(costs, temperature, rng1) for _ in range(50)]
        assert picks == [select_worker(reordered, temperature, rng2) for _ in range(50)]
        assert len(set(picks)) > 1  # the seed fixes the sequence, it does not freeze the choice


def test_softmax_probabilities_formula():
    costs = {"a": 10.0, "b": 11.0, "c": 18.0}
    t = 0.5
    probs = softmax_probabilities(costs, t)
    weights = {k: math.exp(-(c - 10.0) / ((18.0 - 10.0) * t)) for k, c in costs.items()}
    total = sum(weights.values())
    for k in costs:
        assert probs[k] == pytest.approx(weights[k] / total)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs["a"] > probs["b"] > probs["c"] > 0
    # Higher temperature flattens; the ordering stays.
    hot = softmax_probabilities(costs, 10.0)
    assert hot["c"] > probs["c"] and hot["a"] < probs["a"]
    # Normalisation makes it scale-invariant: multiplying every cost changes nothing.
    scaled = softmax_probabilities({k: 100 * c + 7 for k, c in costs.items()}, t)
    assert all(scaled[k] == pytest.approx(probs[k]) for k in costs)
    # T = 0: all mass on the argmin (shared among ties).
    assert softmax_probabilities({"a": 1.0, "b": 1.0, "c": 2.0}, 0.0) == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_all_equal_costs_are_uniform():
    costs = {"a": 4.0, "b": 4.0, "c": 4.0, "d": 4.0}
    for t in (0.0, 0.1, 5.0):
        assert softmax_probabilities(costs, t) == {k: 0.25 for k in costs}
    rng = random.Random(5)
    picks = Counter(select_worker(costs, 1.0, rng) for _ in range(8000))
    assert set(picks) == set(costs) and all(abs(n / 8000 - 0.25) < 0.02 for n in picks.values())


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 3.0])
def test_seeded_sampling_follows_the_softmax(temperature):
    costs = {"w1": 18.0, "w2": 10.0, "w3": 11.0, "w4": 14.0}
    expected = softmax_probabilities(costs, temperature)
    rng = random.Random(1234)
    draws = 20_000
    picks = Counter(select_worker(costs, temperature, rng) for _ in range(draws))
    for name, p in expected.items():
        assert abs(picks[name] / draws - p) < 0.02, (name, picks[name] / draws, p)


def test_tiny_probabilities_never_break_sampling():
    # A very low temperature underflows the losers' weights to ~0; the winner is always picked.
    costs = {"a": 0.0, "b": 1.0, "c": 1.0}
    rng = random.Random(0)
    assert {select_worker(costs, 1e-4, rng) for _ in range(200)} == {"a"}


def test_bad_inputs_are_rejected():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="no candidate"):
        select_worker({}, 0.0, rng)
    with pytest.raises(ValueError, match="temperature"):
        select_worker({"a": 1.0}, -0.1, rng)
    with pytest.raises(ValueError, match="not finite"):
        select_worker({"a": 1.0, "b": math.nan}, 0.5, rng)
    with pytest.raises(ValueError, match="block_size"):
        worker_cost(0, 10, 0, 0, 0, dynamo())

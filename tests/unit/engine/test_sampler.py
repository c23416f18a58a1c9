"""Unit tests for tandem.engine.sampler."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.sampler import (
    Sampler,
    SamplingRequestState,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from tandem.protocols.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEG_INF = float("-inf")


def row(
    device: str = "cpu",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **kw: object,
) -> SamplingRequestState:
    """A batch row; a seed in ``kw`` gets its own generator, as the model runner does."""
    params = SamplingParams(max_tokens=64, **kw)  # type: ignore[arg-type]
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    return SamplingRequestState(params, prompt or [], output or [], gen)


def kept(x: torch.Tensor) -> list[set[int]]:
    """Per row, the token ids that are not -inf."""
    return [set(torch.nonzero(r != NEG_INF).flatten().tolist()) for r in x]


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().unsqueeze(0)


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_of_logits(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g).to(device)
    rows = [row(device, temperature=0.0, top_k=3, top_p=0.5, min_p=0.3) for _ in range(6)]
    out = Sampler(device=device)(logits, rows)
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_works_for_low_precision_logits_and_leaves_input_untouched() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = logits.clone()
    rows = [row(temperature=0.0, frequency_penalty=1.0, output=[1, 2]) for _ in range(3)]
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    expected = apply_penalties(
        logits.float(),
        [[]] * 3,
        [[1, 2]] * 3,
        torch.ones(3),
        torch.zeros(3),
        torch.ones(3),
    ).argmax(dim=1)
    assert out.token_ids == expected.tolist()


def test_mixed_batch_greedy_sampled_and_penalised_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]] * 4)
    rows = [
        row(temperature=0.0),  # plain greedy -> 1
        row(temperature=0.0, output=[1], frequency_penalty=2.0),  # 5 - 2 < 4 -> 2
        row(temperature=1.0, top_k=1, seed=3),  # only token 1 survives top-k
        row(temperature=0.8, top_p=0.01),  # top_p keeps only the top token
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids == [1, 2, 1, 1]


# ---------------------------------------------------------------- reproducibility


def _run_steps(
    rows: list[SamplingRequestState], logits: torch.Tensor, steps: int, sampler: Sampler | None = None
) -> list[list[int]]:
    sampler = sampler or Sampler(seed=123)
    return [sampler(logits, rows).token_ids for _ in range(steps)]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible_across_calls(device: str) -> None:
    logits = torch.zeros(1, 1000, device=device)  # uniform: any repeat would be a coincidence
    a = _run_steps([row(device, seed=7)], logits, 5)
    b = _run_steps([row(device, seed=7)], logits, 5)
    assert a == b
    assert len({t[0] for t in a}) > 1  # the generator advances between steps


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_is_independent_of_batch_composition_and_position(device: str) -> None:
    vocab = 500
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(2)).to(device)
    alone = _run_steps([row(device, seed=42, temperature=0.9, top_k=100)], base[None], 4)
    others = [
        row(device, temperature=0.0),
        row(device, seed=1, top_p=0.7),
        row(device),  # unseeded: uses the sampler's default generator
        row(device, seed=9, output=[3], presence_penalty=1.0),
    ]
    for position in (0, 2, 4):
        batch = list(others)
        batch.insert(position, row(device, seed=42, temperature=0.9, top_k=100))
        logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(position))
        logits = logits.to(device)
        logits[position] = base
        steps = _run_steps(batch, logits, 4, Sampler(seed=position))
        assert [s[position] for s in steps] == [s[0] for s in alone]


def test_different_seeds_give_different_samples() -> None:
    logits = torch.zeros(1, 1000)
    draws = {tuple(t[0] for t in _run_steps([row(seed=s)], logits, 3)) for s in range(10)}
    # 10 seeds x 3 draws from 1000 equally likely tokens: all sequences distinct.
    assert len(draws) == 10


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(4, 1000)
    rows = [row() for _ in range(4)]
    a = _run_steps(rows, logits, 3, Sampler(seed=5))
    b = _run_steps(rows, logits, 3, Sampler(seed=5))
    c = _run_steps(rows, logits, 3, Sampler(seed=6))
    assert a == b
    assert a != c


# ---------------------------------------------------------------- masks


def test_top_k_keeps_the_k_largest_per_row() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 5)
    out = apply_top_k(logits, torch.tensor([2, 1, 0, -1, 9]))
    assert kept(out) == [{1, 3}, {1}, set(range(5)), set(range(5)), set(range(5))]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # kept values untouched


def test_top_k_keeps_all_ties_at_the_boundary() -> None:
    logits = torch.tensor([[5.0, 4.0, 4.0, 1.0, 4.0]])
    assert kept(apply_top_k(logits, torch.tensor([2]))) == [{0, 1, 2, 4}]
    assert kept(apply_top_k(logits, torch.tensor([1]))) == [{0}]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = [0.125, 0.5, 0.0625, 0.25, 0.0625]
    logits = logits_from_probs(probs).repeat(5, 1)
    out = apply_top_p(logits, torch.tensor([0.3, 0.6, 0.8, 0.9, 1.0]))
    assert kept(out) == [{1}, {1, 3}, {1, 3, 0}, {1, 3, 0, 2, 4}, set(range(5))]


def test_top_p_stops_as_soon_as_the_mass_equals_p() -> None:
    # Dyadic probabilities are exact in float32, so the cumulative sums hit p exactly.
    logits = logits_from_probs([0.5, 0.25, 0.125, 0.125]).repeat(2, 1)
    assert kept(apply_top_p(logits, torch.tensor([0.5, 0.75]))) == [{0}, {0, 1}]


def test_top_p_keeps_ties_at_the_boundary_and_at_least_one_token() -> None:
    tie = logits_from_probs([0.4, 0.2, 0.2, 0.2])
    assert kept(apply_top_p(tie, torch.tensor([0.5]))) == [{0, 1, 2, 3}]
    peaked = logits_from_probs([0.001, 0.998, 0.001])
    assert kept(apply_top_p(peaked, torch.tensor([1e-6]))) == [{1}]
    assert kept(apply_top_p(peaked, torch.tensor([0.0]))) == [{1}]
    top_tie = logits_from_probs([0.45, 0.1, 0.45])
    assert kept(apply_top_p(top_tie, torch.tensor([0.01]))) == [{0, 2}]


def test_min_p_drops_tokens_below_the_scaled_top_probability() -> None:
    logits = logits_from_probs([0.3, 0.5, 0.1, 0.1]).repeat(4, 1)
    out = apply_min_p(logits, torch.tensor([0.25, 0.5, 0.1, 0.0]))
    # thresholds: 0.125, 0.25, 0.05, off
    assert kept(out) == [{0, 1}, {0, 1}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    assert kept(apply_min_p(logits[:1], torch.tensor([1.0]))) == [{1}]


def test_masks_compose_after_temperature_in_the_sampler() -> None:
    # top_k=3 leaves {0, 1, 2}; min_p=0.5 then drops token 2 (e^-1 < 0.5 of the top).
    logits = torch.tensor([[3.0, 3.0, 2.0, 1.0, 0.0]])
    sampler = Sampler(seed=0)
    tokens = {sampler(logits, [row(top_k=3, min_p=0.5)]).token_ids[0] for _ in range(50)}
    assert tokens == {0, 1}


# ---------------------------------------------------------------- penalties


def _penalise(
    logits: torch.Tensor, prompt: list[int], output: list[int], rep: float = 1.0, pres: float = 0.0, freq: float = 0.0
) -> torch.Tensor:
    return apply_penalties(logits, [prompt], [output], torch.tensor([rep]), torch.tensor([pres]), torch.tensor([freq]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, -1.0]])
    out = _penalise(logits, prompt=[1, 1], output=[2, 2, 2], rep=2.0)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, -4.0, 3.0, -1.0]]))


def test_presence_penalty_subtracts_once_per_output_token_only() -> None:
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, -1.0]])
    out = _penalise(logits, prompt=[0, 4], output=[1, 1, 3], pres=0.5)
    assert torch.equal(out, torch.tensor([[1.0, 1.5, -2.0, 2.5, -1.0]]))


def test_frequency_penalty_subtracts_count_times_penalty_on_output_only() -> None:
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, -1.0]])
    out = _penalise(logits, prompt=[0, 4], output=[1, 1, 3], freq=0.5)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, -2.0, 2.5, -1.0]]))
    neg = _penalise(logits, prompt=[], output=[2, 2], freq=-1.0)  # negative encourages
    assert torch.equal(neg, torch.tensor([[1.0, 2.0, 0.0, 3.0, -1.0]]))


def test_penalties_are_per_row_and_neutral_rows_are_unchanged() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    out = apply_penalties(
        logits,
        [[0], [0], [0]],
        [[1, 1], [1, 1], [1, 1]],
        torch.tensor([1.0, 2.0, 1.0]),
        torch.tensor([0.0, 0.0, 1.0]),
        torch.tensor([0.0, 0.0, 0.5]),
    )
    expected = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 3.0], [1.0, 0.0, 3.0]])
    assert torch.equal(out, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 3.0]] * 3))  # input not modified


def test_sampler_applies_repetition_penalty_over_the_prompt() -> None:
    logits = torch.tensor([[4.0, 3.0, 1.0]])
    assert Sampler()(logits, [row(temperature=0.0, prompt=[0])]).token_ids == [0]
    assert Sampler()(logits, [row(temperature=0.0, prompt=[0], repetition_penalty=2.0)]).token_ids == [1]


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 1.0]])
    eos = {0}

    def greedy(n_out: int, **kw: object) -> int:
        r = row(temperature=0.0, min_tokens=3, stop_token_ids=[1], output=[3] * n_out, **kw)
        return Sampler()(logits, [r], eos).token_ids[0]

    assert greedy(0) == 2 and greedy(2) == 2
    assert greedy(2, ignore_eos=True) == 2  # ignore_eos does not lift the min_tokens mask
    assert greedy(3) == 0  # reached: EOS is allowed again


def test_min_tokens_mask_is_per_row() -> None:
    logits = torch.zeros(2, 5)
    rows = [row(min_tokens=2, stop_token_ids=[3], output=[1]), row(min_tokens=2, output=[1, 1])]
    out = apply_min_tokens(logits, rows, [0, 4])
    assert kept(out) == [{1, 2}, set(range(5))]
    assert torch.equal(logits, torch.zeros(2, 5))


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_and_top_n_sorted() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(3))
    logits[4, 7] = 10.0  # EOS is the top token of the last row but masked by min_tokens
    rows = [
        row(logprobs=3, temperature=0.5, top_k=5, output=[0], frequency_penalty=2.0, seed=1),
        row(logprobs=None),
        row(logprobs=0, temperature=0.0),
        row(logprobs=20, min_p=0.2, repetition_penalty=1.5, prompt=[1, 2]),
        row(logprobs=2, temperature=0.0, min_tokens=1),
    ]
    out = Sampler()(logits, rows, eos_token_ids={7})
    ref = torch.log_softmax(logits, dim=1)
    assert out.logprobs is not None and out.top_logprobs is not None
    for i, tok in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[i], ref[i, tok].item(), abs_tol=1e-6)
    assert [len(t) for t in out.top_logprobs] == [3, 0, 0, 20, 2]
    assert out.token_ids[4] != 7 and out.top_logprobs[4][0][0] == 7
    for i, top in enumerate(out.top_logprobs):
        vals = [lp for _, lp in top]
        assert vals == sorted(vals, reverse=True)
        expected_ids = ref[i].topk(len(top)).indices.tolist()
        assert [t for t, _ in top] == expected_ids
        for t, lp in top:
            assert math.isclose(lp, ref[i, t].item(), abs_tol=1e-6)


# ---------------------------------------------------------------- distribution


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    mask = probs > 0
    assert counts[~mask].sum() == 0  # never a token with zero probability
    expected = probs[mask] * n
    return float(((counts[mask] - expected) ** 2 / expected).sum())


def test_seeded_samples_follow_the_softmax() -> None:
    n, logits = 4000, torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    rows = [row(seed=s) for s in range(n)]
    out = Sampler()(logits.repeat(n, 1), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).float()
    # 8 categories -> 7 dof; 24.3 is the 0.1% critical value.
    assert _chi_square(counts, logits.softmax(0)) < 24.3


def test_unseeded_samples_follow_tempered_truncated_softmax() -> None:
    n, logits = 4000, torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    out = Sampler(seed=11)(logits.repeat(n, 1), [row(temperature=0.7, top_k=4)] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).float()
    probs = torch.full_like(logits, NEG_INF)
    top = logits.topk(4).indices
    probs[top] = logits[top] / 0.7
    # 4 categories -> 3 dof; 16.3 is the 0.1% critical value.
    assert _chi_square(counts, probs.softmax(0)) < 16.3

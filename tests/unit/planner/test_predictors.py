"""Load predictors on synthetic series: exact values on worked examples, and which one follows a
ramp and which one smooths noise."""

from __future__ import annotations

import math
import random

import pytest

from tandem.planner.predictors import (
    ConstantPredictor,
    HoltPredictor,
    MovingAveragePredictor,
    make_predictor,
)


def feed(predictor, values):
    for value in values:
        predictor.observe(value)
    return predictor.predict()


def test_nothing_observed_predicts_zero():
    assert [make_predictor(name).predict() for name in ("constant", "moving-average", "holt")] == [0.0, 0.0, 0.0]


def test_constant_predicts_the_last_observation_and_ignores_non_finite_values():
    assert feed(ConstantPredictor(), [3.0, 7.0, math.nan, math.inf]) == 7.0


def test_moving_average_is_the_mean_of_the_last_window():
    assert feed(MovingAveragePredictor(window=3), [100.0, 1.0, 2.0, 6.0]) == pytest.approx(3.0)
    assert feed(MovingAveragePredictor(window=3), [4.0]) == 4.0


def test_holt_predicts_a_straight_line_exactly():
    line = [3.0 + 2.0 * t for t in range(10)]  # 3, 5, ..., 21: the next is 23
    assert feed(HoltPredictor(alpha=0.3, beta=0.2), line) == pytest.approx(23.0)


def test_holt_worked_example():
    # Start: level 12 (second value), trend 2. Third value 16 with α = β = 0.5:
    # level = 0.5·16 + 0.5·(12 + 2) = 15, trend = 0.5·(15 − 12) + 0.5·2 = 2.5, prediction 17.5.
    assert feed(HoltPredictor(alpha=0.5, beta=0.5), [10.0, 12.0, 16.0]) == pytest.approx(17.5)


def test_predictions_are_never_negative():
    assert feed(HoltPredictor(), [10.0, 5.0, 0.0]) == 0.0
    assert feed(ConstantPredictor(), [-1.0]) == 0.0


def test_on_a_ramp_holt_lags_less_than_the_moving_average():
    ramp = [5.0 + 0.5 * t for t in range(40)]
    errors = {}
    for name in ("moving-average", "holt"):
        predictor = make_predictor(name, window=6)
        error = 0.0
        for t, value in enumerate(ramp[:-1]):
            predictor.observe(value)
            if t >= 10:
                error += abs(predictor.predict() - ramp[t + 1])
        errors[name] = error
    assert errors["holt"] < errors["moving-average"] / 5


def test_on_noise_around_a_level_the_moving_average_is_steadier_than_the_last_value():
    rng = random.Random(0)
    noisy = [10.0 + rng.gauss(0, 2) for _ in range(200)]
    spread = {}
    for name in ("constant", "moving-average"):
        predictor = make_predictor(name, window=8)
        predictions = []
        for value in noisy:
            predictor.observe(value)
            predictions.append(predictor.predict())
        tail = predictions[20:]
        spread[name] = max(tail) - min(tail)
    assert spread["moving-average"] < spread["constant"] / 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"name": "arima"}, "unknown predictor"), ({"name": "moving-average", "window": 0}, "window"),
     ({"name": "holt", "alpha": 0.0}, "alpha"), ({"name": "holt", "beta": 1.5}, "beta")],
)  # fmt: skip
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_predictor(**kwargs)

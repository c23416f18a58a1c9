"""Load predictors: given one observation per adjustment interval (a request rate, a mean input
length, ...), what will the next interval bring?

* ``constant``: the last observation (reacts at once, no smoothing);
* ``moving-average``: the mean of the last ``window`` observations (smooths noise, lags a trend
  by about half the window);
* ``holt``: Holt's linear trend (double exponential smoothing): a level and a slope, each
  smoothed; it follows a ramp without the moving average's lag, which is what matters at the
  start of a burst or on the rising side of a daily curve.

Predictions are never negative. Before any observation a predictor predicts 0. Predictors are
plain objects with ``observe`` and ``predict``, made by name with :func:`make_predictor`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol


class LoadPredictor(Protocol):
    def observe(self, value: float) -> None:
        """Record the latest interval's value (NaN or infinite values are ignored)."""
        ...

    def predict(self) -> float:
        """The expected value of the next interval (>= 0)."""
        ...


class ConstantPredictor:
    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        if math.isfinite(value):
            self._last = value

    def predict(self) -> float:
        return max(0.0, self._last)


class MovingAveragePredictor:
    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        if math.isfinite(value):
            self._values.append(value)

    def predict(self) -> float:
        if not self._values:
            return 0.0
        return max(0.0, sum(self._values) / len(self._values))


class HoltPredictor:
    """Holt's linear trend: ``level = α·y + (1−α)(level + trend)``, ``trend = β(level − level') +
    (1−β)·trend``, prediction ``level + trend``. Starts from the first two observations (level =
    the second, trend = their difference), so a straight line is predicted exactly from then on."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.alpha, self.beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self._count += 1
        if self._level is None:
            self._level = value
            return
        if self._count == 2:
            self._trend = value - self._level
            self._level = value
            return
        previous = self._level
        self._level = self.alpha * value + (1 - self.alpha) * (previous + self._trend)
        self._trend = self.beta * (self._level - previous) + (1 - self.beta) * self._trend

    def predict(self) -> float:
        if self._level is None:
            return 0.0
        return max(0.0, self._level + self._trend)


PREDICTORS = ("constant", "moving-average", "holt")


def make_predictor(name: str, window: int = 5, alpha: float = 0.5, beta: float = 0.3) -> LoadPredictor:
    """A predictor by name (``PREDICTORS``); ``window`` is the moving average's, ``alpha`` and
    ``beta`` Holt's."""
    if name == "constant":
        return ConstantPredictor()
    if name == "moving-average":
        return MovingAveragePredictor(window)
    if name == "holt":
        return HoltPredictor(alpha, beta)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")

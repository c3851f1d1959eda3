"""Streaming moments of a window (one pass, constant memory) and the features made
from them.

The updates are Welford's for the mean and the second moment, extended to the third and
fourth central moments (Pébay, "Formulas for robust, one-pass parallel computation of
covariances and arbitrary-order statistical moments", Sandia report SAND2008-6212). The
conventions are numpy's and scipy.stats' defaults:

- ``std`` is the **population** standard deviation (``numpy.std(x)``, ddof=0);
- ``rms`` is ``sqrt(mean(x**2))``;
- ``skewness`` is the biased sample skewness ``m3 / m2**1.5`` (``scipy.stats.skew(x)``);
- ``kurtosis`` is the biased **excess** kurtosis ``m4 / m2**2 - 3``
  (``scipy.stats.kurtosis(x)``, Fisher's definition: 0 for a normal distribution);
- ``crest_factor`` is ``max(|x|) / rms``; ``peak_to_peak`` is ``max - min``.

A feature that is not defined for the data (skewness, kurtosis of a constant signal;
crest factor of an all-zero one) is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Below this variance skewness and kurtosis are not computed (see `Moments.feature`).
_TINY_VAR = 1e-150


@dataclass(slots=True)
class Moments:
    """Running count, mean, central moments M2..M4 (sums, not divided by n), extremes."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, x: float) -> None:
        n1 = self.n
        n = self.n = n1 + 1
        delta = x - self.mean
        delta_n = delta / n
        delta_n2 = delta_n * delta_n
        term1 = delta * delta_n * n1
        self.mean += delta_n
        self.m4 += (
            term1 * delta_n2 * (n * n - 3 * n + 3) + 6 * delta_n2 * self.m2 - 4 * delta_n * self.m3
        )
        self.m3 += term1 * delta_n * (n - 2) - 3 * delta_n * self.m2
        self.m2 += term1
        if x < self.lo:
            self.lo = x
        if x > self.hi:
            self.hi = x

    def feature(self, name: str) -> float | int | None:
        """One feature (names as in agent.derive.config.FEATURES); None when undefined
        (and for everything but count when the window holds no value)."""
        n = self.n
        if name == "count":
            return n
        if n == 0:
            return None
        if name == "mean":
            return self.mean
        if name == "min":
            return self.lo
        if name == "max":
            return self.hi
        if name == "peak_to_peak":
            return self.hi - self.lo
        var = max(self.m2 / n, 0.0)
        if name == "std":
            return math.sqrt(var)
        rms = math.sqrt(self.mean * self.mean + var)
        if name == "rms":
            return rms
        if name == "crest_factor":
            peak = max(abs(self.lo), abs(self.hi))
            return peak / rms if rms > 0 else None
        m2 = self.m2
        if var < _TINY_VAR:
            # A constant signal has no shape; below this spread the 4th powers underflow
            # (doubles end near 1e-308), so there is no honest value either.
            return None
        # Divided step by step: m2**1.5 or m2**2 of a tiny spread underflows to 0.
        if name == "skewness":
            return float(math.sqrt(n) * (self.m3 / m2) / math.sqrt(m2))
        if name == "kurtosis":
            return n * (self.m4 / m2) / m2 - 3.0
        raise KeyError(name)

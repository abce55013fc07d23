"""Bootstrap 95% confidence intervals for odd-one-out accuracies and their before/after differences.

Two resampling units:
- triplets (the default): the triplets are resampled with replacement. For a 0/1 outcome the
  resampled count of correct triplets is exactly Binomial(n, k/n), and for paired outcomes the
  resampled counts of the four (before, after) cells are exactly Multinomial(n, cell shares), so
  these are drawn directly: the same distribution as index resampling, at no cost in n.
- objects (for object-disjoint figures, whose triplets share objects): the held-out objects are
  resampled with replacement and a triplet counts as many times as the product of its three
  objects' multiplicities (the multi-way bootstrap), so the interval reflects which objects
  happened to be held out, not only which triplets.

Intervals are percentile intervals of `n_boot` resamples; every function takes a seed.
A before/after difference is "significant" when its paired interval excludes 0, and is worded
"no significant change" otherwise.
"""

from __future__ import annotations

import numpy as np

from alignet_core.errors import InputError
from alignet_core.records import Record

N_BOOT = 2000
LEVEL = 0.95


class Estimate(Record):
    """An accuracy (fraction of correct triplets) with its bootstrap interval; NaN for no triplets."""

    value: float
    low: float
    high: float
    n: int  # triplets scored
    unit: str  # what was resampled: 'triplets' or 'objects'

    def text(self) -> str:
        """e.g. '73.3% [71.2, 75.4]' (percent, 95% interval)."""
        if self.n == 0:
            return "n/a"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


class Difference(Record):
    """after − before on the same triplets, with its paired bootstrap interval."""

    value: float
    low: float
    high: float
    n: int
    unit: str
    significant: bool  # the interval excludes 0

    def text(self) -> str:
        """e.g. '+13.2 points [10.9, 15.4]' or '+0.4 points [-1.9, 2.6], no significant change'."""
        if self.n == 0:
            return "n/a"
        core = f"{100 * self.value:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        return core if self.significant else f"{core}, no significant change"


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _as_bool(correct: np.ndarray, what: str) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 1:
        raise InputError(f"{what}: expected a 1-d array of per-triplet outcomes, got shape {c.shape}")
    return c.astype(bool)


def _object_weights(triplets: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, t) weights: product of the three objects' multiplicities in each object resample."""
    t = np.asarray(triplets, dtype=np.int64)
    if t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"triplets: expected shape (t, 3), got {t.shape}")
    objects, local = np.unique(t, return_inverse=True)
    local = local.reshape(t.shape)
    counts = rng.multinomial(len(objects), np.full(len(objects), 1.0 / len(objects)), size=n_boot)  # (B, m)
    return counts[:, local[:, 0]] * counts[:, local[:, 1]] * counts[:, local[:, 2]]


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per resample: Σ w·v / Σ w; resamples whose weights are all zero are dropped."""
    total = weights.sum(1)
    keep = total > 0
    return (weights[keep] @ values.astype(np.float64)) / total[keep]


def accuracy(
    correct: np.ndarray,
    seed: int,
    triplets: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
) -> Estimate:
    """The fraction of `correct` (t,) outcomes with a bootstrap interval: resampling triplets, or,
    with `triplets` (t, 3) object ids, resampling objects (see the module doc)."""
    c = _as_bool(correct, "correct")
    n = len(c)
    unit = "triplets" if triplets is None else "objects"
    if n == 0:
        return Estimate(value=float("nan"), low=float("nan"), high=float("nan"), n=0, unit=unit)
    rng = np.random.default_rng(seed)
    if triplets is None:
        samples = rng.binomial(n, c.mean(), size=n_boot) / n
    else:
        samples = _weighted_means(_object_weights(triplets, n_boot, rng), c)
    low, high = _bounds(samples, level)
    return Estimate(value=float(c.mean()), low=low, high=high, n=n, unit=unit)


def paired_difference(
    before: np.ndarray,
    after: np.ndarray,
    seed: int,
    triplets: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
) -> Difference:
    """mean(after) − mean(before) over the same triplets, with a paired bootstrap interval
    (resampling triplets, or objects with `triplets` (t, 3))."""
    b, a = _as_bool(before, "before"), _as_bool(after, "after")
    if len(a) != len(b):
        raise InputError(f"paired_difference: {len(b)} outcomes before and {len(a)} after; they must pair up")
    n = len(a)
    unit = "triplets" if triplets is None else "objects"
    if n == 0:
        return Difference(value=float("nan"), low=float("nan"), high=float("nan"), n=0, unit=unit, significant=False)
    rng = np.random.default_rng(seed)
    delta = a.astype(np.int64) - b.astype(np.int64)  # -1, 0, +1 per triplet
    if triplets is None:
        shares = np.array([(delta == -1).mean(), (delta == 0).mean(), (delta == 1).mean()])
        counts = rng.multinomial(n, shares, size=n_boot)
        samples = (counts[:, 2] - counts[:, 0]) / n
    else:
        samples = _weighted_means(_object_weights(triplets, n_boot, rng), delta)
    low, high = _bounds(samples, level)
    return Difference(value=float(delta.mean()), low=low, high=high, n=n, unit=unit,
                      significant=bool(low > 0 or high < 0))


class Comparison(Record):
    """A before/after pair of accuracies on the same triplets and the paired change."""

    before: Estimate
    after: Estimate
    change: Difference


def compare(before: np.ndarray, after: np.ndarray, seed: int, triplets: np.ndarray | None = None) -> Comparison:
    """`Comparison` of two (t,) outcome arrays on the same triplets (objects resampled with `triplets`)."""
    return Comparison(before=accuracy(before, seed, triplets), after=accuracy(after, seed, triplets),
                      change=paired_difference(before, after, seed, triplets))


class MeanEstimate(Record):
    """The mean of a per-item score (e.g. a per-image correlation) with its bootstrap interval."""

    value: float
    low: float
    high: float
    n: int  # items with a finite score

    def text(self, digits: int = 3) -> str:
        """e.g. '0.412 [0.395, 0.430]' (95% interval)."""
        if self.n == 0:
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values: np.ndarray, seed: int, n_boot: int = N_BOOT, level: float = LEVEL) -> MeanEstimate:
    """The mean of the finite entries of `values` (t,) with a percentile bootstrap interval
    (items resampled with replacement). For a paired before/after change pass after − before."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise InputError(f"mean_interval: expected a 1-d array of per-item scores, got shape {v.shape}")
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return MeanEstimate(value=float("nan"), low=float("nan"), high=float("nan"), n=0)
    rng = np.random.default_rng(seed)
    samples = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    low, high = _bounds(samples, level)
    return MeanEstimate(value=float(v.mean()), low=low, high=high, n=len(v))

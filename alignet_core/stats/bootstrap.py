"""95% confidence intervals for odd-one-out accuracies and their before/after differences.

An accuracy is a mean of 0/1 outcomes over t triplets; a before/after change is the mean of the
per-triplet differences (−1, 0, +1) on the same triplets. The interval depends on what varies
between repetitions of the measurement (`unit`):

- 'triplets' (the default; triplets independent of one another): Wilson's score interval for an
  accuracy, and Tango's score interval for a paired change (the discordant triplets: 0 → 1 and
  1 → 0). Both stay inside [0, 1] / [−1, 1] and keep their width at p̂ = 0 or 1 and with few or
  no discordant triplets, where a percentile bootstrap collapses to a point.
- 'objects' (with `triplets` (t, 3): held-out-object figures, whose triplets share objects): the
  variance of the mean counts the covariance of every two triplets that share an object (crossed
  random effects: an object that is easy for the model makes every triplet it appears in easier).
  It is the delete-one-object jackknife in its linear form, with the overlap counted once:
  with e_r = y_r − ȳ, D_i = Σ_{r ∋ i} e_r per object, P_ij per object pair and T_ijk per object set,

      V = (Σ_i D_i² − Σ_ij P_ij² + Σ_ijk T_ijk²) / (t² − Σ_i n_i² + Σ_ij n_ij² − Σ_ijk n_ijk²)

  (inclusion–exclusion: a pair of triplets sharing 1, 2 or 3 objects enters the numerator once; the
  n are the triplet counts of the same groups, and the denominator removes the bias of centring at
  ȳ: the same formula gives p̂(1 − p̂)/(t − 1) when no two triplets share an object). A plain
  delete-one-object jackknife counts each triplet's own noise three times (once per object), and
  resampling objects with each triplet weighted by the product of its objects' counts (the multi-way
  bootstrap this module used before) about eight times; resampling triplets ignores the sharing.
  V over p̂(1 − p̂)/(t − 1) is the design effect (at least 1); the interval is Wilson's with
  n_eff = t / design effect (accuracy), or Tango's with the discordant counts and t divided by the
  design effect of the per-triplet changes (change: a Rao–Scott adjustment), and Student's t quantile
  with m − 1 degrees of freedom (m objects). Cost: O(t log t) time (grouping the object pairs) and
  O(t) memory.

Measured coverage (simulated object-disjoint test sets with per-object effects on the log-odds of
correctness; tests/stats/test_interval_coverage.py, 1,000 sets per setting; benchmarks/intervals.py):
92.7–95.8% for accuracies and changes over 60–600 objects in sparse and dense triplets, 94.9% / 95.2% on
382 objects and 1,273 triplets, where the multi-way object bootstrap covered 100% / 99.8% with intervals
1.87× as wide, and the triplet intervals 33–87% on such sets. A plain delete-one-object jackknife (no
correction) covered 99.4% on sparse sets; with the correction V_jk − 2p̂(1 − p̂)/t it matches this one
(widths within 4%). Cost at 200,000 triplets over 1,854 objects: 0.3 s and 39 MiB per call.

Expected accuracy (`expected_accuracy`, `expected_change`; core `mean_interval_clustered`): the mean of
per-triplet choice probabilities p in [0, 1] (the human probability of the odd one the model picks), or of
the paired changes p_after − p_before, with mean ± q·√V: over independent triplets V = Σ e² / (t(t − 1))
and q normal; over triplets sharing objects V is the clustered variance above (at least the iid one, as
for the design effect) and q Student's t with m − 1 degrees of freedom; clipped to [0, 1] / [−1, 1].
Measured coverage (p = σ(μ + a_i + a_j + a_k + ε), ε ~ N(0, 1) per triplet; 1,000 sets per setting;
tests/stats/test_interval_coverage.py): 93.0–95.6% for means and changes over 60–600 objects in sparse
and dense triplets (60 objects in 120 triplets: 93.5% over 10,000 sets, a small-sample shortfall; 92.1%
there near the ceiling, μ = 2.6), 95.2% for Beta-drawn values on 200 objects, 93.4–96.2% on independent
triplets.

`seed` is accepted for a stable signature: the intervals are computed, not resampled, and do not
depend on it. A before/after difference is "significant" when its interval excludes 0, and is worded
"no significant change" otherwise. `mean_interval` (a per-item score's mean) is a percentile
bootstrap over items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from alignet_core.errors import InputError
from alignet_core.records import Record

if TYPE_CHECKING:  # scipy is imported where an interval is computed: a cached rerun never loads it
    from scipy import sparse

N_BOOT = 2000
LEVEL = 0.95

#: what an interval was computed by, per unit (the `method` field of `Estimate` and `Difference`)
METHODS = {
    ("accuracy", "triplets"): "Wilson score",
    ("accuracy", "objects"): "Wilson score, object-clustered design effect",
    ("change", "triplets"): "Tango score",
    ("change", "objects"): "Tango score, object-clustered design effect",
    ("expected", "triplets"): "normal, mean of choice probabilities",
    ("expected", "objects"): "Student t, object-clustered variance (mean of choice probabilities)",
    ("expected_change", "triplets"): "normal, paired mean of choice-probability changes",
    ("expected_change", "objects"): "Student t, object-clustered variance (paired choice-probability changes)",
}


class Estimate(Record):
    """An accuracy (fraction of correct triplets, or an expected accuracy: a mean of per-triplet choice
    probabilities) with its 95% interval; NaN for no triplets."""

    value: float
    low: float
    high: float
    n: int  # triplets scored
    unit: str  # what is independent between repetitions: 'triplets' or 'objects'
    method: str = ""  # how the interval was computed (`METHODS`)

    def text(self) -> str:
        """e.g. '73.3% [71.2, 75.4]' (percent, 95% interval)."""
        if self.n == 0:
            return "n/a"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


class Difference(Record):
    """after − before on the same triplets, with its paired 95% interval."""

    value: float
    low: float
    high: float
    n: int
    unit: str
    significant: bool  # the interval excludes 0
    method: str = ""

    def text(self) -> str:
        """e.g. '+13.2 points [10.9, 15.4]' or '+0.4 points [-1.9, 2.6], no significant change'."""
        if self.n == 0:
            return "n/a"
        core = f"{100 * self.value:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        return core if self.significant else f"{core}, no significant change"


def _as_bool(correct: np.ndarray, what: str) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 1:
        raise InputError(f"{what}: expected a 1-d array of per-triplet outcomes, got shape {c.shape}")
    return c.astype(bool)


class ObjectOverlap:
    """Which triplets share objects: the groups (objects, object pairs, object sets) the clustered
    variance sums over, built once per set of triplets.

    triplets: (t, 3) int object ids, three distinct ids per row."""

    #: triplets × columns of outcomes summed at a time: the per-group sums, (≤ 3t, columns) float64, stay
    #: under 3 · 8 · CELLS bytes (24 MB) each
    CELLS = 1_000_000
    #: object ids are renumbered 0..m−1 and an object set is keyed as (i·m + j)·m + k in int64
    MAX_OBJECTS = 2**21

    def __init__(self, triplets: np.ndarray):
        tri = np.asarray(triplets)
        if tri.ndim != 2 or tri.shape[1] != 3 or not np.issubdtype(tri.dtype, np.integer):
            raise InputError(f"triplets: expected (t, 3) integer object ids, got shape {tri.shape}, dtype {tri.dtype}")
        tri = np.sort(tri.astype(np.int64), axis=1)  # (t, 3), ascending ids per row
        if len(tri) and ((tri[:, 0] == tri[:, 1]) | (tri[:, 1] == tri[:, 2])).any():
            raise InputError("triplets: a row names one object twice; each triplet needs three distinct objects")
        t = len(tri)
        local, m = _dense_ids(tri)  # (t, 3) in [0, m), still ascending per row
        if m >= self.MAX_OBJECTS:
            raise InputError(f"triplets: {m} distinct objects; at most {self.MAX_OBJECTS - 1} are supported")
        pair_key = np.stack([local[:, 0] * m + local[:, 1], local[:, 0] * m + local[:, 2],
                             local[:, 1] * m + local[:, 2]], axis=1)  # (t, 3), < m²
        pair, _ = _dense_ids(pair_key)
        group, _ = _dense_ids(pair_key[:, :1] * m + local[:, 2:])  # (t, 1): one id per object set, key < m³
        self.t, self.m = t, m
        self.membership = [self._membership(ids) for ids in (local, pair, group)]  # (t, groups) each
        counts = [np.bincount(ids.ravel()).astype(np.float64) for ids in (local, pair, group)]  # triplets per group
        self.denominator = float(t) ** 2 - counts[0] @ counts[0] + counts[1] @ counts[1] - counts[2] @ counts[2]

    @staticmethod
    def _membership(ids: np.ndarray) -> sparse.csr_matrix:
        """(t, groups) 0/1: triplet r lies in groups ids[r, :] (k per row: built as CSR directly, no sort)."""
        from scipy import sparse

        t, k = ids.shape
        groups = int(ids.max()) + 1 if t else 0
        return sparse.csr_matrix((np.ones(t * k), ids.ravel(), np.arange(0, t * k + 1, k)), shape=(t, groups))

    def covariance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Estimated Cov(mean x, mean y) of columns of outcomes on these triplets, counting every two
        triplets that share an object (module doc). x, y: (t,) or (t, R) float; returns () or (R,)."""
        x2, y2 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        one = x2.ndim == 1
        x2, y2 = (x2[:, None], y2[:, None]) if one else (x2, y2)
        ex, ey = x2 - x2.mean(0), y2 - y2.mean(0)
        out = np.empty(x2.shape[1])
        step = max(1, self.CELLS // max(1, self.t))
        for lo in range(0, x2.shape[1], step):
            cols = slice(lo, lo + step)
            terms = [np.einsum("gr,gr->r", a.T @ ex[:, cols], a.T @ ey[:, cols]) for a in self.membership]
            out[cols] = terms[0] - terms[1] + terms[2]
        out = out / self.denominator if self.denominator > 0 else np.full_like(out, np.nan)
        return out[0] if one else out


def _dense_ids(keys: np.ndarray, table_limit: int = 2**23) -> tuple[np.ndarray, int]:
    """Non-negative int64 `keys` (any shape) renumbered 0..g−1 in increasing order, and g. A lookup table
    (O(n), 5 bytes per possible key) when the largest key is below `table_limit`, else np.unique (a sort)."""
    if keys.size and keys.min() >= 0 and keys.max() < table_limit:
        present = np.zeros(int(keys.max()) + 1, bool)
        present[keys] = True
        lookup = np.cumsum(present, dtype=np.int64 if len(present) >= 2**31 else np.int32) - 1
        return lookup[keys], int(present.sum())
    uniq, inverse = np.unique(keys, return_inverse=True)
    return inverse.reshape(keys.shape), len(uniq)


def _quantile(level: float, overlap: ObjectOverlap | None = None) -> float:
    """The two-sided normal quantile for `level`; Student's t with m − 1 degrees of freedom where the
    variance comes from the sums of m objects (as for a cluster-robust variance with m clusters)."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    q = 0.5 + level / 2.0
    return float(norm.ppf(q) if overlap is None or overlap.m < 2 else student_t.ppf(q, overlap.m - 1))


def wilson(p: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval for a proportion p̂ from n (effective) trials; arrays broadcast."""
    p, n = np.asarray(p, np.float64), np.asarray(n, np.float64)
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * np.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    low = np.where(p <= 0.0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exactly 0 / 1 there, not rounding residue
    high = np.where(p >= 1.0, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


def design_effect(values: np.ndarray, overlap: ObjectOverlap | None) -> np.ndarray:
    """V / V_iid per column of `values` (t,) or (t, R): the object-clustered variance of the mean over the
    variance it would have from t independent triplets (Σ e² / (t(t − 1)), what the clustered formula gives
    when no two triplets share an object). At least 1 (triplets sharing objects carry no more information
    than independent ones; per-object effects only add covariance); 1 with no overlap or no spread."""
    v = np.asarray(values, np.float64)
    if overlap is None:
        return np.ones(v.shape[1:])
    t = v.shape[0]
    iid = ((v - v.mean(0)) ** 2).sum(0) / (t * (t - 1.0)) if t > 1 else np.zeros(v.shape[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        deff = np.where(iid > 0, overlap.covariance(v, v) / iid, 1.0)
    return np.maximum(np.nan_to_num(deff, nan=1.0), 1.0)


def tango(better: np.ndarray, worse: np.ndarray, n: np.ndarray, z: float, steps: int = 60
          ) -> tuple[np.ndarray, np.ndarray]:
    """Tango's score interval (Stat. Med. 1998) for Δ = P(better) − P(worse) from paired outcomes: n pairs,
    `better` of them 0 → 1 and `worse` 1 → 0 (counts may be fractional: divided by a design effect).

    The score statistic Z(Δ₀) = (better − worse − nΔ₀) / √(n(q̃₊ + q̃₋ − Δ₀²)) uses the discordant shares
    q̃ fitted under Δ₀ (the larger root of the likelihood equation, a quadratic), so the interval keeps its
    width with few or no discordant pairs; Z decreases in Δ₀ and each end is found by `steps` bisections
    (2⁻⁶⁰: exact in float64). Arrays broadcast; returns (low, high)."""
    b, w, n = (np.asarray(x, np.float64) for x in (better, worse, n))
    d = (b - w) / n

    def score(delta: np.ndarray) -> np.ndarray:
        lin = w * (1 - 3 * delta) + b * (1 - delta) - 2 * (n - b - w) * delta
        q_worse = (lin + np.sqrt(np.maximum(lin * lin + 8 * n * w * delta * (1 - delta), 0.0))) / (4 * n)
        q_worse = np.clip(q_worse, np.maximum(0.0, -delta), (1 - delta) / 2)
        var = n * np.maximum(2 * q_worse + delta - delta * delta, 1e-300)
        return (b - w - n * delta) / np.sqrt(var)

    ends = []
    for target, lo, hi in ((z, np.full_like(d, -1.0), d.copy()), (-z, d.copy(), np.full_like(d, 1.0))):
        for _ in range(steps):
            mid = (lo + hi) / 2
            above = score(mid) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        ends.append((lo + hi) / 2)
    return ends[0], ends[1]


def accuracy_interval(correct: np.ndarray, overlap: ObjectOverlap | None, level: float = LEVEL
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) for each column of `correct` (t,) or (t, R) 0/1: Wilson's interval with t trials
    (overlap None) or with n_eff = t / design effect. The vectorized core of `accuracy`."""
    c = np.asarray(correct, np.float64)
    t = c.shape[0]
    p = c.mean(0)
    low, high = wilson(p, t / design_effect(c, overlap), _quantile(level, overlap))
    return p, low, high


def difference_interval(before: np.ndarray, after: np.ndarray, overlap: ObjectOverlap | None,
                        level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) of mean(after) − mean(before) per column of (t,) or (t, R) 0/1 outcomes: Tango's
    score interval on the discordant triplets, with the counts divided by the design effect of the
    per-triplet changes (1 without overlap). The vectorized core of `paired_difference`."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    t = a.shape[0]
    change = a - b  # (t, R) in {−1, 0, +1}
    deff = design_effect(change, overlap)
    low, high = tango((change > 0).sum(0) / deff, (change < 0).sum(0) / deff, t / deff, _quantile(level, overlap))
    return change.mean(0), np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)


def accuracy(
    correct: np.ndarray,
    seed: int,
    triplets: np.ndarray | ObjectOverlap | None = None,
    level: float = LEVEL,
) -> Estimate:
    """The fraction of `correct` (t,) outcomes with its 95% interval: independent triplets, or, with
    `triplets` (t, 3) object ids (or their `ObjectOverlap`, to reuse), triplets that share objects (module
    doc). `seed` is not used."""
    return _estimate("accuracy", _as_bool(correct, "correct"), triplets, level, accuracy_interval)


def _estimate(kind: str, values: np.ndarray, triplets: np.ndarray | ObjectOverlap | None, level: float,
              core: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Estimate:
    """The `Estimate` of checked per-triplet `values` by `core(values, overlap, level)` (NaN for none)."""
    unit = "triplets" if triplets is None else "objects"
    method = METHODS[(kind, unit)]
    if len(values) == 0:
        return Estimate(value=float("nan"), low=float("nan"), high=float("nan"), n=0, unit=unit, method=method)
    overlap = None if triplets is None else _overlap(triplets, len(values))
    p, low, high = core(values, overlap, level)
    return Estimate(value=float(p), low=float(low), high=float(high), n=len(values), unit=unit, method=method)


def _difference(kind: str, before: np.ndarray, after: np.ndarray, triplets: np.ndarray | ObjectOverlap | None,
                level: float, core: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Difference:
    """The paired `Difference` of checked per-triplet values by `core(before, after, overlap, level)`."""
    if len(after) != len(before):
        raise InputError(f"{kind}: {len(before)} values before and {len(after)} after; they must pair up")
    unit = "triplets" if triplets is None else "objects"
    method = METHODS[(kind, unit)]
    if len(after) == 0:
        return Difference(value=float("nan"), low=float("nan"), high=float("nan"), n=0, unit=unit,
                          significant=False, method=method)
    overlap = None if triplets is None else _overlap(triplets, len(after))
    d, low, high = core(before, after, overlap, level)
    return Difference(value=float(d), low=float(low), high=float(high), n=len(after), unit=unit,
                      significant=bool(low > 0 or high < 0), method=method)


def _overlap(triplets: np.ndarray | ObjectOverlap, t: int) -> ObjectOverlap:
    overlap = triplets if isinstance(triplets, ObjectOverlap) else ObjectOverlap(triplets)
    if overlap.t != t:
        raise InputError(f"triplets: {overlap.t} rows for {t} outcomes; they must pair up")
    return overlap


def paired_difference(
    before: np.ndarray,
    after: np.ndarray,
    seed: int,
    triplets: np.ndarray | ObjectOverlap | None = None,
    level: float = LEVEL,
) -> Difference:
    """mean(after) − mean(before) over the same triplets, with its paired 95% interval (independent
    triplets, or triplets sharing the objects of `triplets` (t, 3)). `seed` is not used."""
    return _difference("change", _as_bool(before, "before"), _as_bool(after, "after"), triplets, level,
                       difference_interval)


def _as_probabilities(values: np.ndarray, what: str) -> np.ndarray:
    """`values` as a 1-d float64 array of per-triplet probabilities, or InputError naming the problem."""
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what}: expected per-triplet probabilities (numbers in [0, 1]): {err}") from None
    if v.ndim != 1:
        raise InputError(f"{what}: expected a 1-d array of per-triplet probabilities, got shape {v.shape}")
    bad = ~np.isfinite(v)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"{what}: {int(bad.sum())} non-finite value(s) (NaN or inf), the first at index {first}; "
                         "probabilities must be finite")
    out = (v < 0.0) | (v > 1.0)
    if out.any():
        first = int(np.flatnonzero(out)[0])
        raise InputError(f"{what}: {int(out.sum())} value(s) outside [0, 1], e.g. {v[first]!r} at index {first}; "
                         "expected probabilities")
    return v


def mean_interval_clustered(values: np.ndarray, overlap: ObjectOverlap | None, level: float = LEVEL,
                            bounds: tuple[float, float] = (0.0, 1.0)
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) of the mean of each column of `values` (t,) or (t, R): mean ± q·√V clipped to
    `bounds`. V is Σ e² / (t(t − 1)) (overlap None; q normal) or the object-clustered variance
    `overlap.covariance`, but at least that iid variance (as in `design_effect`; q Student's t with m − 1
    degrees of freedom). A constant column has a zero-width interval at its value; a single triplet gives
    the whole of `bounds` (no spread to estimate); no triplets, NaN. The vectorized core of
    `expected_accuracy` and `expected_change`."""
    v = np.asarray(values, np.float64)
    t = v.shape[0]
    lo_bound, hi_bound = bounds
    if t == 0:
        nan = np.full(v.shape[1:], np.nan)
        return nan, nan.copy(), nan.copy()
    constant = v.max(0) == v.min(0)
    mean = np.where(constant, v[0], v.mean(0))  # a constant column: exactly its value, no rounding residue
    if t == 1:
        return mean, np.full_like(mean, lo_bound), np.full_like(mean, hi_bound)
    var = ((v - v.mean(0)) ** 2).sum(0) / (t * (t - 1.0))
    if overlap is not None:
        var = np.fmax(overlap.covariance(v, v), var)  # NaN (no estimable clustered variance) → the iid one
    half = _quantile(level, overlap) * np.sqrt(np.where(constant, 0.0, var))
    return mean, np.clip(mean - half, lo_bound, hi_bound), np.clip(mean + half, lo_bound, hi_bound)


def expected_accuracy(
    values: np.ndarray,
    seed: int,
    triplets: np.ndarray | ObjectOverlap | None = None,
    level: float = LEVEL,
) -> Estimate:
    """The expected accuracy mean(p) of per-triplet choice probabilities `values` (t,) in [0, 1] (the
    human probability of the odd one the model picks) with its 95% interval: normal over independent
    triplets, or Student's t with the object-clustered variance with `triplets` (t, 3) object ids (or their
    `ObjectOverlap`) (`mean_interval_clustered`). `seed` is not used."""
    return _estimate("expected", _as_probabilities(values, "values"), triplets, level, mean_interval_clustered)


def expected_change(
    before: np.ndarray,
    after: np.ndarray,
    seed: int,
    triplets: np.ndarray | ObjectOverlap | None = None,
    level: float = LEVEL,
) -> Difference:
    """mean(after − before) of per-triplet choice probabilities in [0, 1] on the same triplets, with its
    paired 95% interval (as `expected_accuracy`, on the differences; clipped to [−1, 1]). `seed` is not
    used."""
    def core(b: np.ndarray, a: np.ndarray, overlap: ObjectOverlap | None, lv: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return mean_interval_clustered(a - b, overlap, lv, bounds=(-1.0, 1.0))

    return _difference("expected_change", _as_probabilities(before, "before"), _as_probabilities(after, "after"),
                       triplets, level, core)


class Comparison(Record):
    """A before/after pair of accuracies on the same triplets and the paired change."""

    before: Estimate
    after: Estimate
    change: Difference


def compare(before: np.ndarray, after: np.ndarray, seed: int, triplets: np.ndarray | None = None) -> Comparison:
    """`Comparison` of two (t,) outcome arrays on the same triplets (objects shared with `triplets` (t, 3))."""
    if triplets is not None:
        triplets = _overlap(triplets, len(np.asarray(before)))  # grouped once for the three intervals
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
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return MeanEstimate(value=float(v.mean()), low=float(lo), high=float(hi), n=len(v))

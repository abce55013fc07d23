"""The 95% intervals of `stats.bootstrap` cover the truth 95% of the time on simulated test sets whose
triplets share objects (per-object effects on the log-odds of a correct answer: crossed random effects),
and on independent triplets.

Data (`benchmarks.intervals.simulate`): m objects; t triplets of three distinct objects drawn uniformly
("sparse": each object in about 6 triplets; "dense": about 120); each replicate draws new object effects
a_i ~ N(0, 0.5²) before and ρ = 0.8-correlated ones after, and a triplet is right when
u < σ(μ + a_i + a_j + a_k), one u per triplet for both (paired outcomes that mostly agree). The true
accuracy E σ(μ + a_i + a_j + a_k) is a Gauss–Hermite integral, so truth is known to 1e-10.

The band: with R = 1,000 replicates the coverage estimate of a method whose true coverage is 0.95 has
binomial sd √(.95 · .05 / 1000) = 0.0069; [0.92, 0.98] is ±4.35 sd around 0.95, so a correct method leaves
it with probability ≈ 1.4e-5 per check (≈ 3e-4 over the ~20 checks here, whatever the seed). A method that
truly covers 0.90 (sd 0.0095) leaves it 98% of the time (0.92 is 2.1 sd above 0.90); the old method's 1.00
always does.

What the old method measured (benchmarks/results/intervals.json, 382 objects, 1,273 triplets, the same
400 replicates for both): the multi-way object bootstrap covered 100% of accuracies and 99.75% of changes
with intervals 1.87× and 1.83× as wide as the new ones (mean 15.5 vs 8.3 points; the spread of the estimate
says 8.2), which covered 94.9% and 95.2% over 4,000 replicates. `test_the_replaced_object_bootstrap_over_covers`
keeps that measurable here on a smaller setting.

Expected accuracy (a mean of per-triplet choice probabilities in [0, 1], `expected_accuracy` /
`expected_change`, core `mean_interval_clustered`): `_simulate_expected` makes the probability itself
p_r = σ(μ + a_i + a_j + a_k + ε_r), with object effects a ~ N(0, 0.5²) as above and per-triplet noise
ε ~ N(0, 1) (after: ρ = 0.8-correlated a and ε), so the truth E σ(μ + N(0, 3τ² + σ²)) is again a
Gauss–Hermite integral (1e-10); one setting draws the value from Beta(4π, 4(1 − π)) around π = that
σ(...) (same mean, values down to 0 and 1). The same BAND applies.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm
from scipy.stats import t as student_t

from alignet_core.errors import InputError
from alignet_core.stats.bootstrap import (
    METHODS,
    ObjectOverlap,
    accuracy,
    accuracy_interval,
    difference_interval,
    expected_accuracy,
    expected_change,
    mean_interval_clustered,
)
from benchmarks.intervals import crossed_design, old_object_bootstrap, simulate

R = 1000
BAND = (0.92, 0.98)  # 0.95 ± 4.35 binomial sd at R = 1,000 (module doc)


def _coverage(lo: np.ndarray, hi: np.ndarray, truth: float) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


def _object_coverage(m: int, per_object: int, seed: int, **effects: float) -> tuple[float, float]:
    """(accuracy coverage, change coverage) of the object intervals over R simulated test sets."""
    rng = np.random.default_rng(seed)
    tri = crossed_design(m, per_object * m // 3, rng)
    before, after, p_before, p_after = simulate(tri, R, rng, **effects)
    overlap = ObjectOverlap(tri)
    _, lo, hi = accuracy_interval(before, overlap)
    _, dlo, dhi = difference_interval(before, after, overlap)
    return _coverage(lo, hi, p_before), _coverage(dlo, dhi, p_after - p_before)


SETTINGS = [
    pytest.param(60, 6, id="60-objects-sparse"),
    pytest.param(60, 120, id="60-objects-dense"),
    pytest.param(200, 6, id="200-objects-sparse"),
    pytest.param(200, 120, id="200-objects-dense"),
    pytest.param(600, 6, id="600-objects-sparse"),
    pytest.param(600, 120, id="600-objects-dense", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("m", "per_object"), SETTINGS)
def test_object_intervals_cover_accuracy_and_change_at_the_nominal_rate(m: int, per_object: int) -> None:
    acc, change = _object_coverage(m, per_object, seed=m + per_object)
    assert BAND[0] <= acc <= BAND[1], f"accuracy coverage {acc}"
    assert BAND[0] <= change <= BAND[1], f"change coverage {change}"


def test_object_intervals_cover_near_the_ceiling() -> None:
    """A true accuracy of 0.92 → 0.94 on 120 triplets of 60 objects (about 10 errors per test set; a
    test set with none happens): Wilson's interval with the effective n keeps its coverage there."""
    acc, change = _object_coverage(60, 6, seed=7, mu_before=2.6, mu_after=3.0)
    assert BAND[0] <= acc <= BAND[1], f"accuracy coverage {acc}"
    assert BAND[0] <= change <= BAND[1], f"change coverage {change}"


@pytest.mark.parametrize(("t", "mu"), [(100, 0.3), (400, 0.3), (400, 2.6)], ids=["100-mid", "400-mid", "400-high"])
def test_triplet_intervals_cover_independent_triplets(t: int, mu: float) -> None:
    """Every triplet with its own objects (no sharing): Wilson (accuracy) and Tango (paired change)."""
    rng = np.random.default_rng(t + int(10 * mu))
    before, after, p_before, p_after = simulate(np.zeros((t, 3), int), R, rng, mu_before=mu, mu_after=mu + 0.2,
                                                shared_objects=False)
    _, lo, hi = accuracy_interval(before, None)
    _, dlo, dhi = difference_interval(before, after, None)
    assert BAND[0] <= _coverage(lo, hi, p_before) <= BAND[1]
    assert BAND[0] <= _coverage(dlo, dhi, p_after - p_before) <= BAND[1]


def test_triplet_intervals_under_cover_when_triplets_share_objects() -> None:
    """Why held-out-object figures use the object unit: on 60 objects in ~120 triplets each, intervals that
    treat triplets as independent cover the true accuracy about a third of the time (measured 0.35)."""
    rng = np.random.default_rng(5)
    tri = crossed_design(60, 2400, rng)
    before, _, p_before, _ = simulate(tri, 300, rng)
    _, lo, hi = accuracy_interval(before, None)
    assert _coverage(lo, hi, p_before) < 0.6


def test_the_replaced_object_bootstrap_over_covers() -> None:
    """The multi-way object bootstrap (a triplet weighted by the product of its objects' resample counts)
    on 60 objects, 120 triplets, 200 replicates: coverage ≥ 0.99 (binomial sd at 0.95 would be 0.015, so
    0.99 is 2.6 sd above nominal) with mean width ≥ 1.4× the new intervals' (measured: 1.8×; in the
    benchmark's 382-object setting 1.87×)."""
    rng = np.random.default_rng(11)
    tri = crossed_design(60, 120, rng)
    before, _, p_before, _ = simulate(tri, 200, rng)
    old = np.array([old_object_bootstrap(before[:, r].astype(float), tri, r, n_boot=500) for r in range(200)])
    _, lo, hi = accuracy_interval(before, ObjectOverlap(tri))
    assert _coverage(old[:, 0], old[:, 1], p_before) >= 0.99
    assert np.mean(old[:, 1] - old[:, 0]) >= 1.4 * np.mean(hi - lo)


def test_the_vectorized_core_is_what_the_public_functions_return() -> None:
    """The coverage above is measured on `accuracy_interval` / `difference_interval` over many columns at
    once; `accuracy` on one column gives the same numbers (to rounding: same operations, 1e-12)."""
    rng = np.random.default_rng(2)
    tri = crossed_design(40, 200, rng)
    before, _, _, _ = simulate(tri, 3, rng)
    _, lo, hi = accuracy_interval(before, ObjectOverlap(tri))
    for r in range(3):
        est = accuracy(before[:, r], seed=0, triplets=tri)
        assert est.low == pytest.approx(lo[r], abs=1e-12) and est.high == pytest.approx(hi[r], abs=1e-12)


# ---- expected accuracy: means of per-triplet choice probabilities ----------------------------------------


def _true_mean(mu: float, sd: float) -> float:
    """E σ(μ + sd · Z), Z ~ N(0, 1): 120-node Gauss–Hermite (error far below 1e-10)."""
    x, w = np.polynomial.hermite_e.hermegauss(120)
    return float((w * expit(mu + sd * x)).sum() / w.sum())


def _simulate_expected(triplets: np.ndarray, replicates: int, rng: np.random.Generator, mu_before: float = 0.3,
                       mu_after: float = 0.5, tau: float = 0.5, sigma: float = 1.0, rho: float = 0.8,
                       shared_objects: bool = True) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(before, after) (t, R) probabilities σ(μ + a_i + a_j + a_k + ε_r) and their true means (module doc);
    `shared_objects=False`: every triplet its own objects (independent triplets)."""
    t = len(triplets)
    if shared_objects:
        m = int(triplets.max()) + 1
        a = rng.normal(0.0, tau, (m, replicates))
        c = rho * a + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, tau, (m, replicates))
        sa, sc = a[triplets].sum(1), c[triplets].sum(1)
    else:
        sa = rng.normal(0.0, np.sqrt(3.0) * tau, (t, replicates))
        sc = rho * sa + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, np.sqrt(3.0) * tau, (t, replicates))
    e = rng.normal(0.0, sigma, (t, replicates))
    e_after = rho * e + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, sigma, (t, replicates))
    sd = float(np.sqrt(3.0 * tau * tau + sigma * sigma))
    return (expit(mu_before + sa + e), expit(mu_after + sc + e_after),
            _true_mean(mu_before, sd), _true_mean(mu_after, sd))


EXPECTED_SETTINGS = [
    pytest.param(60, 6, id="60-objects-sparse"),
    pytest.param(60, 120, id="60-objects-dense"),
    pytest.param(200, 6, id="200-objects-sparse"),
    pytest.param(200, 120, id="200-objects-dense"),
    pytest.param(600, 6, id="600-objects-sparse"),
]


@pytest.mark.parametrize(("m", "per_object"), EXPECTED_SETTINGS)
def test_object_intervals_cover_expected_accuracy_and_change(m: int, per_object: int) -> None:
    """Measured (R = 1,000; accuracy / change): 60 sparse .937 / .930, 60 dense .948 / .938, 200 sparse
    .955 / .948, 200 dense .949 / .950, 600 sparse .946 / .956. Over 10,000 replicates 60 sparse is
    .935 / .936 (a slight small-sample shortfall: 120 triplets, each object in ~6)."""
    rng = np.random.default_rng(m + per_object)
    tri = crossed_design(m, per_object * m // 3, rng)
    before, after, p_before, p_after = _simulate_expected(tri, R, rng)
    overlap = ObjectOverlap(tri)
    _, lo, hi = mean_interval_clustered(before, overlap)
    _, dlo, dhi = mean_interval_clustered(after - before, overlap, bounds=(-1.0, 1.0))
    acc, change = _coverage(lo, hi, p_before), _coverage(dlo, dhi, p_after - p_before)
    assert BAND[0] <= acc <= BAND[1], f"expected accuracy coverage {acc}"
    assert BAND[0] <= change <= BAND[1], f"expected change coverage {change}"


def test_object_intervals_cover_expected_accuracy_of_beta_drawn_probabilities() -> None:
    """Values drawn from Beta(4π, 4(1 − π)) around π = σ(μ + a_i + a_j + a_k + ε) (mean π: the same truth),
    200 objects in ~120 triplets each. Measured .952 (60 objects in 120 triplets: .922, not asserted)."""
    rng = np.random.default_rng(3)
    tri = crossed_design(200, 8000, rng)
    pi, _, truth, _ = _simulate_expected(tri, R, rng)
    values = rng.beta(4.0 * pi, 4.0 * (1.0 - pi))
    _, lo, hi = mean_interval_clustered(values, ObjectOverlap(tri))
    assert BAND[0] <= _coverage(lo, hi, truth) <= BAND[1]


@pytest.mark.parametrize(("t", "mu"), [(100, 0.3), (400, 0.3), (400, 2.6)], ids=["100-mid", "400-mid", "400-high"])
def test_triplet_intervals_cover_expected_accuracy_on_independent_triplets(t: int, mu: float) -> None:
    """Every triplet with its own objects: mean ± z · sd / √t (measured .953 / .962, .960 / .934,
    .946 / .952 for accuracy / change)."""
    rng = np.random.default_rng(t)
    before, after, p_before, p_after = _simulate_expected(np.zeros((t, 3), int), R, rng, mu_before=mu,
                                                          mu_after=mu + 0.2, shared_objects=False)
    _, lo, hi = mean_interval_clustered(before, None)
    _, dlo, dhi = mean_interval_clustered(after - before, None, bounds=(-1.0, 1.0))
    assert BAND[0] <= _coverage(lo, hi, p_before) <= BAND[1]
    assert BAND[0] <= _coverage(dlo, dhi, p_after - p_before) <= BAND[1]


def test_expected_public_functions_return_the_vectorized_core() -> None:
    """`expected_accuracy` / `expected_change` on one column give `mean_interval_clustered`'s numbers (the
    same operations on one column: 1e-12), with the unit and method of `METHODS`."""
    rng = np.random.default_rng(4)
    tri = crossed_design(40, 200, rng)
    before, after, _, _ = _simulate_expected(tri, 3, rng)
    overlap = ObjectOverlap(tri)
    _, lo, hi = mean_interval_clustered(before, overlap)
    _, dlo, dhi = mean_interval_clustered(after - before, overlap, bounds=(-1.0, 1.0))
    for r in range(3):
        est = expected_accuracy(before[:, r], seed=0, triplets=tri)
        assert est.low == pytest.approx(lo[r], abs=1e-12) and est.high == pytest.approx(hi[r], abs=1e-12)
        assert (est.unit, est.method, est.n) == ("objects", METHODS[("expected", "objects")], 200)
        chg = expected_change(before[:, r], after[:, r], seed=0, triplets=overlap)
        assert chg.low == pytest.approx(dlo[r], abs=1e-12) and chg.high == pytest.approx(dhi[r], abs=1e-12)
        assert chg.significant == bool(chg.low > 0 or chg.high < 0)
        assert (chg.unit, chg.method) == ("objects", METHODS[("expected_change", "objects")])
    est = expected_accuracy(before[:, 0], seed=0)
    assert (est.unit, est.method) == ("triplets", METHODS[("expected", "triplets")])


@pytest.mark.parametrize(("bad", "words"), [
    (np.array([0.2, 1.5, 0.4]), "outside [0, 1]"),
    (np.array([0.2, -0.1]), "outside [0, 1]"),
    (np.array([0.2, np.nan]), "non-finite"),
    (np.array([np.inf, 0.3]), "non-finite"),
    (np.full((4, 2), 0.5), "1-d"),
], ids=["above-1", "below-0", "nan", "inf", "2-d"])
def test_expected_rejects_values_that_are_not_probabilities(bad: np.ndarray, words: str) -> None:
    with pytest.raises(InputError, match=re.escape(words)):
        expected_accuracy(bad, seed=0)
    ok = np.full(bad.shape, 0.5)
    with pytest.raises(InputError, match=re.escape(words)):
        expected_change(ok, bad, seed=0)


def test_expected_change_needs_paired_lengths_and_matching_triplets() -> None:
    with pytest.raises(InputError, match="pair up"):
        expected_change(np.full(3, 0.5), np.full(4, 0.5), seed=0)
    with pytest.raises(InputError, match="pair up"):
        expected_accuracy(np.full(3, 0.5), seed=0, triplets=np.array([[0, 1, 2], [1, 2, 3]]))


def test_expected_on_no_triplets_is_nan_with_n_0() -> None:
    est = expected_accuracy(np.array([]), seed=0)
    assert est.n == 0 and np.isnan(est.value) and np.isnan(est.low) and est.text() == "n/a"
    chg = expected_change(np.array([]), np.array([]), seed=0, triplets=np.zeros((0, 3), int))
    assert chg.n == 0 and np.isnan(chg.value) and not chg.significant and chg.unit == "objects"


def test_expected_object_interval_without_shared_objects_is_the_triplet_one_with_t_quantile() -> None:
    """t triplets over 3t distinct objects: the clustered variance reduces to Σ e² / (t(t − 1)) (each object,
    pair and set holds one triplet: numerator 3S − 3S + S, denominator t² − 3t + 3t − t), so the half-widths
    differ only by q = t₀.₉₇₅(3t − 1) against z. Tolerance from the rounding: each of the three sums of t or
    3t squares has relative error ≤ 3tε and they cancel to S, so V is within ≈ 20tε of Σ e² / (t(t − 1))
    relatively, √V within 10tε; the subtraction (high − value) adds ≤ 2ε absolute (values ≤ 1)."""
    t = 300
    rng = np.random.default_rng(8)
    values = rng.uniform(0.3, 0.7, t)
    tri = np.arange(3 * t).reshape(t, 3)
    obj, iid = expected_accuracy(values, 0, tri), expected_accuracy(values, 0)
    q, z = student_t.ppf(0.975, 3 * t - 1), norm.ppf(0.975)
    eps = np.finfo(float).eps
    assert obj.value == iid.value
    for o_half, i_half in ((obj.high - obj.value, iid.high - iid.value), (obj.value - obj.low, iid.value - iid.low)):
        assert abs(o_half / q - i_half / z) <= 20 * t * eps * (i_half / z) + 4 * eps / z
    assert 0.0 < iid.low < iid.high < 1.0  # nothing clipped: the comparison is of the unclipped half-widths
    after = rng.uniform(0.3, 0.7, t)
    dobj, diid = expected_change(values, after, 0, tri), expected_change(values, after, 0)
    assert dobj.value == diid.value
    o_half, i_half = dobj.high - dobj.value, diid.high - diid.value
    assert abs(o_half / q - i_half / z) <= 20 * t * eps * (i_half / z) + 4 * eps / z


@pytest.mark.parametrize("value", [0.0, 0.1, 0.37, 1.0])
def test_expected_of_a_constant_has_a_zero_width_interval(value: float) -> None:
    rng = np.random.default_rng(9)
    tri = crossed_design(30, 100, rng)
    for est in (expected_accuracy(np.full(100, value), 0), expected_accuracy(np.full(100, value), 0, tri)):
        assert est.value == est.low == est.high == value
    same = expected_change(np.full(100, value), np.full(100, value), 0, tri)
    assert same.value == same.low == same.high == 0.0 and same.significant is False

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
"""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.stats.bootstrap import ObjectOverlap, accuracy, accuracy_interval, difference_interval
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

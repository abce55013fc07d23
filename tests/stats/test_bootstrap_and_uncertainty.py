"""Confidence intervals that hold their nominal coverage, and uncertainty metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from alignet_core.errors import InputError
from alignet_core.stats.bootstrap import ObjectOverlap, accuracy, compare, paired_difference
from alignet_core.stats.uncertainty import (
    choice_distribution,
    entropy,
    jsd,
    uncertainty_agreement,
)
from benchmarks.intervals import crossed_design


def test_the_interval_covers_a_known_accuracy_at_its_nominal_rate() -> None:
    """1,000 simulated test sets of 400 triplets with true accuracy 0.62: the 95% interval (Wilson) covers
    0.62 in 93–97% of them (binomial sd of the coverage estimate 0.0069: ±2.9 sd)."""
    rng = np.random.default_rng(0)
    covered = 0
    for draw in range(1000):
        est = accuracy(rng.random(400) < 0.62, seed=draw)
        covered += est.low <= 0.62 <= est.high
    assert 930 <= covered <= 970, covered


def test_the_paired_interval_covers_a_known_difference_at_its_nominal_rate() -> None:
    """Before: right with probability .55. After: each outcome is redrawn as right (.15), wrong
    (.05) or kept (.80), so E[after − before] = .15 + .80 · .55 − .55 = .04."""
    true_delta = 0.15 + 0.80 * 0.55 - 0.55
    rng = np.random.default_rng(1)
    covered = 0
    for draw in range(1000):
        before = rng.random(400) < 0.55
        u = rng.random(400)
        after = np.where(u < 0.15, True, np.where(u < 0.20, False, before))
        d = paired_difference(before, after, seed=draw)
        covered += d.low <= true_delta <= d.high
    assert 930 <= covered <= 970, covered


def test_estimates_report_value_n_unit_and_words() -> None:
    est = accuracy(np.array([1, 1, 0, 1], bool), seed=0)
    assert est.value == 0.75 and est.n == 4 and est.unit == "triplets" and est.low <= 0.75 <= est.high
    assert accuracy(np.zeros(0, bool), seed=0).text() == "n/a"
    same = paired_difference(np.array([1, 0] * 50, bool), np.array([0, 1] * 50, bool), seed=0)
    assert same.value == 0.0 and not same.significant and same.text().endswith("no significant change")
    # all 200 triplets improve: Tango's interval keeps a width (a percentile bootstrap gave [+100, +100]);
    # with no worse triplets the fitted discordant shares are (1 ∓ Δ)/2, so the lower end solves
    # 200(1 − Δ) = z·√(200(1 − Δ²)), i.e. Δ = (200 − z²)/(200 + z²) = 0.962
    better = paired_difference(np.zeros(200, bool), np.ones(200, bool), seed=0)
    assert better.significant and better.text() == "+100.0 points [+96.2, +100.0]"
    assert better.method == "Tango score" and est.method == "Wilson score"
    # all right: Wilson's lower end t / (t + z²) = 4 / 7.84, not a point at 100%
    assert accuracy(np.ones(4, bool), seed=0).text() == "100.0% [51.0, 100.0]"
    with pytest.raises(InputError, match="pair up"):
        paired_difference(np.zeros(3, bool), np.zeros(4, bool), seed=0)


def test_object_intervals_widen_with_object_effects_and_only_then() -> None:
    """Triplets over 30 objects whose outcomes are driven by which objects they contain: the object interval
    is wider than the triplet one. Outcomes independent of the objects (200 objects, 2,000 triplets): the
    object interval is about as wide as the triplet one (the multi-way bootstrap it replaced was ~2.8× as
    wide whatever the outcomes: benchmarks/results/intervals.json).

    Tolerance: with no object effects the estimated design effect is 1 + noise; over 300 simulated sets of
    this size it had mean 1.12, sd 0.18, 99th percentile 1.74 (width ratio = √deff: 1.06, q99 1.32), so a
    width ratio below 1.5 (deff 2.25, six sd above its mean) holds for any seed."""
    rng = np.random.default_rng(3)
    trip = np.stack([rng.choice(30, 3, replace=False) for _ in range(600)])
    correct = (trip < 10).any(1) | (rng.random(600) < 0.3)  # objects 0-9 make triplets easy
    by_t = accuracy(correct, seed=0)
    by_o = accuracy(correct, seed=0, triplets=trip)
    assert by_o.unit == "objects" and by_o.value == by_t.value
    assert (by_o.high - by_o.low) > 1.5 * (by_t.high - by_t.low)
    assert by_o.low <= by_o.value <= by_o.high
    trip = crossed_design(200, 2000, rng)
    noise = rng.random(2000) < 0.6
    by_t, by_o = accuracy(noise, seed=0), accuracy(noise, seed=0, triplets=trip)
    assert 1.0 <= (by_o.high - by_o.low) / (by_t.high - by_t.low) < 1.5


def test_object_intervals_refuse_malformed_triplets() -> None:
    with pytest.raises(InputError, match="distinct"):
        accuracy(np.ones(2, bool), seed=0, triplets=np.array([[0, 1, 2], [3, 3, 4]]))
    with pytest.raises(InputError, match="pair up"):
        accuracy(np.ones(3, bool), seed=0, triplets=np.array([[0, 1, 2], [3, 5, 4]]))


def test_compare_groups_the_triplets_once_and_matches_the_single_calls() -> None:
    rng = np.random.default_rng(6)
    trip = crossed_design(50, 300, rng)
    before, after = rng.random(300) < 0.5, rng.random(300) < 0.6
    both = compare(before, after, seed=0, triplets=trip)
    assert both.before == accuracy(before, seed=0, triplets=trip)
    assert both.change == paired_difference(before, after, seed=0, triplets=trip)
    assert both.change.method == "Tango score, object-clustered design effect" and both.change.unit == "objects"
    with pytest.raises(InputError, match="pair up"):
        accuracy(before[:10], seed=0, triplets=ObjectOverlap(trip))


def test_uncertainty_metrics_on_hand_computed_cases() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    q = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    # entropy: 0 and -(.5 ln .5 + 2 · .25 ln .25) = 1.5 ln 2
    np.testing.assert_allclose(entropy(p), [0.0, 1.5 * math.log(2)])
    # JSD of row 0: m = (.75, .125, .125); ½KL(p‖m) = ½ ln(1/.75); ½KL(q‖m) = ½(.5 ln(.5/.75) + .5 ln 2)
    want0 = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    np.testing.assert_allclose(jsd(p, q), [want0, 0.0], atol=1e-12)
    agree = uncertainty_agreement(p, q)
    # NLL = −Σ p log q: row 0 = ln 2, row 1 = .5 ln 2 + .5 ln 4 = 1.5 ln 2
    assert agree.nll == pytest.approx((math.log(2) + 1.5 * math.log(2)) / 2)
    assert agree.jsd == pytest.approx(want0 / 2)
    assert agree.n == 2 and math.isnan(agree.entropy_spearman)  # q has one entropy: no ranking
    # ECE: both rows have confidence .5 on column 0 (correct): |1 − .5| = .5
    assert agree.ece == pytest.approx(0.5)


def test_entropy_correlation_matches_scipy_and_softmax_is_stable() -> None:
    rng = np.random.default_rng(4)
    p = rng.dirichlet([1, 1, 1], size=50)
    s = np.log(p) * 2.0 + rng.normal(scale=0.3, size=p.shape)
    q = choice_distribution(s, temperature=2.0)
    np.testing.assert_allclose(q.sum(1), 1.0)
    want = spearmanr(entropy(p), entropy(q)).statistic
    assert uncertainty_agreement(p, q).entropy_spearman == pytest.approx(want)
    assert np.isfinite(choice_distribution(np.array([[1e4, 0.0, -1e4]]))).all()
    with pytest.raises(InputError, match="sum to 1"):
        uncertainty_agreement(p, q * 2)

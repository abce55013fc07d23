"""Stage-1 metrics: RSA, ECE, NLL, k-NN overlap, object folds, the linear probe (real fits)."""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.stats.metrics import (
    choice_nll,
    dissimilarity_matrix,
    expected_calibration_error,
    knn_overlap,
    linear_probe,
    nearest_neighbours,
    object_folds,
    relative_accuracy,
    rsa,
)
from alignet_core.synthetic import make_synthetic_human

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rsa_hand_cases() -> None:
    e = np.random.default_rng(0).normal(size=(12, 5))
    d = dissimilarity_matrix(e)
    assert rsa(d, d) == pytest.approx(1.0)
    assert rsa(d, 2 * d + 1) == pytest.approx(1.0)  # rank-based
    assert rsa(d, -d) == pytest.approx(-1.0)
    assert np.allclose(np.diag(d), 0, atol=1e-12)
    with pytest.raises(ValueError):
        rsa(d, d[:5, :5])


def test_ece_and_nll_hand_cases() -> None:
    # perfectly calibrated: confidence 0.5, half of the rows correct (chosen pair in column 0)
    p = np.array([[0.5, 0.3, 0.2], [0.3, 0.5, 0.2]] * 10)
    assert expected_calibration_error(p) == pytest.approx(0.0)
    # always confident 0.9, never right
    q = np.array([[0.05, 0.9, 0.05]] * 4)
    assert expected_calibration_error(q) == pytest.approx(0.9)
    # two bins: conf 0.9 all right (|1 − 0.9|), conf 0.6 none right (|0 − 0.6|), equal weight
    r = np.array([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2]])
    assert expected_calibration_error(r) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    assert choice_nll(np.array([[0.5, 0.25, 0.25]])) == pytest.approx(np.log(2))
    assert relative_accuracy(0.6, 0.67) == pytest.approx(0.6 / 0.67)


def test_knn_overlap_hand_cases() -> None:
    e = np.random.default_rng(1).normal(size=(30, 4))
    assert knn_overlap(e, e, 5) == 1.0
    assert knn_overlap(e, 3.0 * e, 5) == 1.0  # cosine: scale-free
    rot, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))
    assert knn_overlap(e, e @ rot, 5) == pytest.approx(1.0)
    assert knn_overlap(e, np.random.default_rng(3).normal(size=(30, 4)), 5) < 0.6



def _stable_neighbours(e: np.ndarray, k: int) -> np.ndarray:
    """The definition: a stable full sort of each row's cosine similarities, itself excluded."""
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    c = u @ u.T
    np.fill_diagonal(c, -np.inf)
    return np.argsort(-c, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("k", [1, 5, 38])
def test_nearest_neighbours_equal_a_stable_full_sort_with_ties(k: int) -> None:
    """The partial sort answers what a stable full sort of the similarities answers, order included, also
    where rows tie at the k-th similarity (duplicated rows, a row scaled: equal cosines)."""
    rng = np.random.default_rng(4)
    e = rng.normal(size=(40, 6))
    e[10] = e[3]  # duplicates: exactly equal similarities to every other row
    e[11] = 2.0 * e[3]
    e[20:25] = e[5]
    got = nearest_neighbours(e, k)
    assert got.shape == (40, k)
    assert np.array_equal(got, _stable_neighbours(e, k))
    plain = rng.normal(size=(300, 8))  # no ties: the partial-sort path alone
    assert np.array_equal(nearest_neighbours(plain, k), _stable_neighbours(plain, k))

def test_object_folds_never_mix_train_and_test_objects() -> None:
    t = make_synthetic_human(n_objects=40, n_triplets=4000, seed=1).triplets
    folds = object_folds(40, t, 4, seed=0)
    assert len(folds) == 4
    covered = set()
    for train_rows, test_rows in folds:
        test_objects = set(np.unique(t[test_rows]))
        train_objects = set(np.unique(t[train_rows]))
        assert len(test_rows) > 0 and len(train_rows) > 0
        assert not test_objects & train_objects
        assert len(test_objects) <= 10
        covered |= set(test_rows.tolist())
    assert len(covered) == sum(len(te) for _, te in folds)  # test sets disjoint


def test_linear_probe_beats_zero_shot() -> None:
    s = make_synthetic_human(n_objects=90, n_triplets=8000, seed=2)
    r = linear_probe(s.features, s.triplets, n_folds=3, epochs=5, lr=1e-2, seed=0)
    assert len(r["probed"]) == 3 and all(n > 50 for n in r["n_test"])
    assert r["probed_mean"] > r["zero_shot_mean"] + 0.05

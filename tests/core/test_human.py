"""The demo's taxonomy-derived proxy triplets, the train/val split and object embeddings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.transform.human import make_proxy_triplets, object_embeddings, split_triplets


def _taxonomy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """~1,900 objects: 10 categories, each with 12 subcategories of uneven size (some singletons)."""
    rng = np.random.default_rng(seed)
    coarse = np.repeat(np.arange(10), 190)
    fine = coarse * 100 + rng.integers(0, 12, len(coarse))
    fine[[0, 190]] = [99, 199]  # two singleton subcategories: never the source of a pair
    return fine, coarse


def _same_pair(fine: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(m, 3) bool: which of the pairs [(0,1), (0,2), (1,2)] of each row shares a fine group."""
    f = fine[t]
    return np.stack([f[:, 0] == f[:, 1], f[:, 0] == f[:, 2], f[:, 1] == f[:, 2]], 1)


def test_without_noise_pair_shares_a_group_and_odd_one_does_not() -> None:
    fine, coarse = _taxonomy()
    for c in (coarse, None):
        t, p = make_proxy_triplets(fine, c, 5000, noise=0.0, seed=1)
        assert t.shape == (5000, 3) and t.dtype == np.int64 and p.dtype == np.float32
        assert (fine[t[:, 0]] == fine[t[:, 1]]).all()
        assert (fine[t[:, 2]] != fine[t[:, 0]]).all()
        assert np.allclose(p, [1.0, 0.0, 0.0])
        assert not np.isin(t[:, :2], [0, 190]).any()  # singletons cannot give the pair
    t, _ = make_proxy_triplets(fine, coarse, 20000, noise=0.0, seed=2)
    hard = coarse[t[:, 2]] == coarse[t[:, 0]]
    assert 0.45 < hard.mean() < 0.55  # half the odd ones from the same category


def test_noise_fraction_and_difficulty() -> None:
    fine, coarse = _taxonomy()
    t, p = make_proxy_triplets(fine, coarse, 20000, noise=0.2, seed=3)
    same = _same_pair(fine, t)
    assert (same.sum(1) == 1).all()  # exactly one taxonomic pair in every row
    wrong = ~same[:, 0]  # the observed odd one is not the taxonomic one
    assert abs(wrong.mean() - 0.2) < 0.015
    # hard triplets (odd one from the same category) are answered against taxonomy more often
    tax_odd = np.where(same[:, 0], t[:, 2], np.where(same[:, 1], t[:, 1], t[:, 0]))
    pair_member = np.where(same[:, 2], t[:, 1], t[:, 0])
    hard = coarse[tax_odd] == coarse[pair_member]
    assert wrong[hard].mean() > 2 * wrong[~hard].mean()


def test_probabilities_sum_to_one_and_follow_the_row_order() -> None:
    fine, coarse = _taxonomy()
    t, p = make_proxy_triplets(fine, coarse, 20000, noise=0.3, seed=4)
    assert np.allclose(p.sum(1), 1.0, atol=1e-6) and (p >= 0).all()
    same = _same_pair(fine, t)
    p_tax = p[same]  # the probability sitting on the taxonomic pair, wherever the row put it
    p_other = p[~same].reshape(-1, 2)
    assert (p_tax[:, None] > p_other).all()
    assert np.allclose(p_other[:, 0], p_other[:, 1])
    # the response was drawn from the probabilities: the chosen pair (0,1) has mean prob ≈ P(chosen)
    assert abs(p[:, 0].mean() - np.mean(np.sum(p * p, 1))) < 0.02


def test_deterministic_for_a_seed_and_fast() -> None:
    fine, coarse = _taxonomy()
    start = time.perf_counter()
    a = make_proxy_triplets(fine, coarse, 20000, noise=0.1, seed=5)
    assert time.perf_counter() - start < 0.5
    b = make_proxy_triplets(fine, coarse, 20000, noise=0.1, seed=5)
    c = make_proxy_triplets(fine, coarse, 20000, noise=0.1, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_bad_taxonomies_are_input_errors() -> None:
    with pytest.raises(InputError, match="2 or more"):
        make_proxy_triplets(np.arange(5), None, 10, 0.1, 0)
    with pytest.raises(InputError, match="only one group"):
        make_proxy_triplets(np.zeros(5, int), None, 10, 0.1, 0)
    with pytest.raises(InputError, match="nest"):
        make_proxy_triplets(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 10, 0.1, 0)
    with pytest.raises(InputError, match="noise"):
        make_proxy_triplets(np.array([0, 0, 1, 1]), None, 10, 1.0, 0)
    # one category only: every odd one is a hard one, still valid
    fine = np.array([0, 0, 1, 1, 2])
    t, _ = make_proxy_triplets(fine, np.zeros(5, int), 50, 0.0, 0)
    assert (fine[t[:, 2]] != fine[t[:, 0]]).all()


def test_split_triplets() -> None:
    tr, va = split_triplets(1000, 0.1, seed=0)
    assert len(va) == 100 and len(tr) == 900
    assert np.array_equal(np.sort(np.r_[tr, va]), np.arange(1000))
    tr2, va2 = split_triplets(1000, 0.1, seed=0)
    assert np.array_equal(va, va2) and not np.array_equal(va, split_triplets(1000, 0.1, seed=1)[1])
    with pytest.raises(InputError, match="val_fraction"):
        split_triplets(10, 1.0, 0)


def test_object_embeddings_are_means_over_images() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 4)).astype(np.float16)
    obj = np.array([2, 0, 2, -1, 1, 0, 2])
    out = object_embeddings(emb, obj, 3)
    assert out.shape == (3, 4) and out.dtype == np.float32
    e = emb.astype(np.float64)
    assert np.allclose(out, [e[[1, 5]].mean(0), e[4], e[[0, 2, 6]].mean(0)], atol=1e-6)
    with pytest.raises(InputError, match="object 3"):
        object_embeddings(emb, obj, 4)
    with pytest.raises(InputError, match="outside"):
        object_embeddings(emb, np.array([0, 1, 2, 3, 4, 5, 9]), 6)

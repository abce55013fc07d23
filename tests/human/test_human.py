"""The taxonomy proxy triplets at a mix of levels, the train/val split and object embeddings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.human.levels import check_level
from alignet_core.human.triplets import (
    make_proxy_triplets,
    object_embeddings,
    split_triplets,
)


def _taxonomy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """~1,900 objects: 10 categories, each with 12 subcategories of uneven size (some singletons)."""
    rng = np.random.default_rng(seed)
    coarse = np.repeat(np.arange(10), 190)
    fine = coarse * 100 + rng.integers(0, 12, len(coarse))
    fine[[0, 190]] = [99, 199]  # two singleton subcategories: never the source of a pair
    return fine, coarse


MIX = {"category_boundary": 0.4, "sibling_boundary": 0.4, "class_boundary": 0.2}


def test_without_noise_every_row_satisfies_its_level() -> None:
    fine, coarse = _taxonomy()
    t, p, level = make_proxy_triplets(coarse, fine, MIX, 5000, noise=0.0, seed=1)
    assert t.shape == (5000, 3) and t.dtype == np.int64 and p.dtype == np.float32
    assert np.allclose(p, [1.0, 0.0, 0.0])
    assert {lv: int((level == lv).sum()) for lv in MIX} == {"category_boundary": 2000, "sibling_boundary": 2000, "class_boundary": 1000}
    for lv in MIX:
        assert check_level(coarse, fine, lv, t[level == lv]).all(), lv
    assert not np.isin(t[level != "category_boundary"][:, :2], [0, 190]).any()  # singletons cannot give a same-class pair


def test_noise_fraction_and_difficulty() -> None:
    fine, coarse = _taxonomy()
    t, p, level = make_proxy_triplets(coarse, fine, {"category_boundary": 0.5, "sibling_boundary": 0.5}, 20000, noise=0.2, seed=3)
    truth, _, _ = make_proxy_triplets(coarse, fine, {"category_boundary": 0.5, "sibling_boundary": 0.5}, 20000, noise=0.0, seed=3)
    # the same draws (same seed): a row is answered against the taxonomy when its odd one moved
    wrong = t[:, 2] != truth[:, 2]
    assert abs(wrong.mean() - 0.2) < 0.015
    assert wrong[level == "sibling_boundary"].mean() > 1.3 * wrong[level == "category_boundary"].mean()  # local is harder (1.5 vs 1.0)


def test_probabilities_sum_to_one_and_follow_the_row_order() -> None:
    fine, coarse = _taxonomy()
    t, p, _ = make_proxy_triplets(coarse, fine, MIX, 20000, noise=0.3, seed=4)
    truth, _, _ = make_proxy_triplets(coarse, fine, MIX, 20000, noise=0.0, seed=4)
    assert np.allclose(p.sum(1), 1.0, atol=1e-6) and (p >= 0).all()
    # the probability of the taxonomic pair (the pair without the taxonomic odd one) is the largest
    tax_pair = np.where(t[:, 2] == truth[:, 2], 0, np.where(t[:, 1] == truth[:, 2], 1, 2))
    p_tax = p[np.arange(len(p)), tax_pair]
    assert (p_tax[:, None] >= p).all()
    # the response was drawn from the probabilities: the chosen pair (0,1) has mean prob ≈ P(chosen)
    assert abs(p[:, 0].mean() - np.mean(np.sum(p * p, 1))) < 0.02


def test_deterministic_for_a_seed_and_fast() -> None:
    fine, coarse = _taxonomy()
    start = time.perf_counter()
    a = make_proxy_triplets(coarse, fine, MIX, 20000, noise=0.1, seed=5)
    assert time.perf_counter() - start < 0.5
    b = make_proxy_triplets(coarse, fine, MIX, 20000, noise=0.1, seed=5)
    c = make_proxy_triplets(coarse, fine, MIX, 20000, noise=0.1, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_bad_taxonomies_and_mixes_are_input_errors() -> None:
    with pytest.raises(InputError, match=r"none of the levels \['sibling_boundary'\] can be drawn"):
        make_proxy_triplets(np.zeros(5, int), np.arange(5), {"sibling_boundary": 1.0}, 10, 0.1, 0)
    with pytest.raises(InputError, match="none of the levels"):
        make_proxy_triplets(np.zeros(5, int), np.array([0, 0, 1, 1, 2]), {"category_boundary": 1.0}, 10, 0.1, 0)
    # a level the objects do not admit gives its share to the others (and says so)
    t, _, level = make_proxy_triplets(np.zeros(5, int), np.array([0, 0, 1, 1, 2]), {"category_boundary": 0.5, "sibling_boundary": 0.5},
                                      10, 0.0, 0)
    assert (level == "sibling_boundary").all() and len(t) == 10
    with pytest.raises(InputError, match="nest"):
        make_proxy_triplets(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), {"sibling_boundary": 1.0}, 10, 0.1, 0)
    with pytest.raises(InputError, match="noise"):
        make_proxy_triplets(np.zeros(4, int), np.array([0, 0, 1, 1]), {"sibling_boundary": 1.0}, 10, 1.0, 0)
    with pytest.raises(InputError, match="unknown levels"):
        make_proxy_triplets(np.zeros(4, int), np.array([0, 0, 1, 1]), {"subcategory": 1.0}, 10, 0.1, 0)
    with pytest.raises(InputError, match="positive sum"):
        make_proxy_triplets(np.zeros(4, int), np.array([0, 0, 1, 1]), {"sibling_boundary": 0.0}, 10, 0.1, 0)


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

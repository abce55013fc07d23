"""Abstraction-level triplets on the demo taxonomy, and object-disjoint splits that never share an object."""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.config import parse_config
from alignet_core.errors import InputError
from alignet_core.human.data import load_human_data, taxonomy
from alignet_core.human.levels import LEVELS, check_level, level_triplets
from alignet_core.human.triplets import fold_splits, object_folds
from alignet_core.io import sources


@pytest.fixture(scope="module")
def demo_taxonomy() -> tuple[np.ndarray, np.ndarray]:
    cfg = parse_config({})
    labels = taxonomy(cfg, sources.source_from_config(cfg.source))
    assert labels is not None
    return labels


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_satisfies_its_definition_row_by_row_on_the_demo(demo_taxonomy, level) -> None:
    coarse, fine = demo_taxonomy
    t = level_triplets(coarse, fine, level, 3000, np.random.default_rng(0))
    assert t.shape == (3000, 3) and t.dtype == np.int64
    c, f = coarse[t], fine[t]
    assert (t[:, 0] != t[:, 1]).all() and (t[:, 2] != t[:, 0]).all() and (t[:, 2] != t[:, 1]).all()
    if level == "category_boundary":
        assert (c[:, 0] == c[:, 1]).all() and (f[:, 0] != f[:, 1]).all() and (c[:, 2] != c[:, 0]).all()
    elif level == "sibling_boundary":
        assert (f[:, 0] == f[:, 1]).all() and (c[:, 2] == c[:, 0]).all() and (f[:, 2] != f[:, 0]).all()
    else:
        assert (f[:, 0] == f[:, 1]).all() and (f[:, 2] != f[:, 0]).all()
        assert (c[:, 2] != c[:, 0]).mean() > 0.5  # most odd ones are in another category
    assert check_level(coarse, fine, level, t).all()
    # every other level's check rejects most of these rows (the levels are distinct)
    for other in LEVELS:
        if other != level and {level, other} != {"sibling_boundary", "class_boundary"}:
            assert not check_level(coarse, fine, other, t).any()
    # deterministic for a seed; the pool restricts every item
    again = level_triplets(coarse, fine, level, 3000, np.random.default_rng(0))
    assert np.array_equal(t, again)
    pool = np.arange(0, len(coarse), 3)
    sub = level_triplets(coarse, fine, level, 500, np.random.default_rng(1), pool=pool)
    assert np.isin(sub, pool).all() and check_level(coarse, fine, level, sub).all()


def test_a_pool_without_a_level_is_an_input_error() -> None:
    coarse, fine = np.array(["a", "a", "a"]), np.array(["x", "x", "y"])
    with pytest.raises(InputError, match="no category_boundary triplet"):
        level_triplets(coarse, fine, "category_boundary", 5, np.random.default_rng(0))
    assert check_level(coarse, fine, "sibling_boundary", level_triplets(coarse, fine, "sibling_boundary", 5, np.random.default_rng(0))).all()


def test_object_split_never_shares_an_object_between_roles() -> None:
    """A property over many seeds, sizes and fold counts: for every fold of the rotation, no object of
    the fold is in a training triplet, test triplets lie wholly in the fold, every row has one role,
    and over the k folds each test row is scored once and each row trains the folds it avoids."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_objects = int(rng.integers(6, 400))
        folds = int(rng.integers(2, 8))
        triplets = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(int(rng.integers(1, 600)))])
        fold_of = object_folds(n_objects, folds, seed=trial)
        assert np.bincount(fold_of, minlength=folds).max() - np.bincount(fold_of, minlength=folds).min() <= 1
        splits = fold_splits(triplets, fold_of, folds)
        for f, sp in enumerate(splits):
            assert not (fold_of[triplets[sp.train]] == f).any()
            assert (fold_of[triplets[sp.test]] == f).all()
            inside = (fold_of[triplets[sp.partial]] == f).sum(1)
            assert ((inside == 1) | (inside == 2)).all()
            assert np.array_equal(np.sort(np.concatenate([sp.train, sp.test, sp.partial])), np.arange(len(triplets)))
            assert sp.n_mixed == len(sp.partial)
        tested = np.concatenate([sp.test for sp in splits])
        assert len(np.unique(tested)) == len(tested)  # each test row in exactly one fold
        one_fold = (fold_of[triplets] == fold_of[triplets][:, :1]).all(1)
        assert np.array_equal(np.sort(tested), np.flatnonzero(one_fold))
        trains = np.bincount(np.concatenate([sp.train for sp in splits]), minlength=len(triplets))
        n_folds_touched = np.array([len(set(r)) for r in fold_of[triplets].tolist()])
        assert np.array_equal(trains, folds - n_folds_touched)


def test_the_demo_proxy_is_drawn_inside_each_fold(tmp_path) -> None:
    cfg = parse_config({"root": str(tmp_path), "human": {"proxy_n_triplets": 5000, "folds": 5, "test_fold": 2}})
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    sp = data.split
    assert sp.n_mixed == 0 and len(sp.train) + len(sp.test) == 5000
    assert set(data.fold_of[data.triplets[sp.test]].ravel().tolist()) == {2}
    assert 2 not in set(data.fold_of[data.triplets[sp.train]].ravel().tolist())
    assert 900 <= len(sp.test) <= 1100  # in proportion to the test fold's objects
    assert set(data.level_of.tolist()) == {"category_boundary", "sibling_boundary"}
    for f in range(5):  # every triplet lies inside one fold, and every fold has test triplets
        assert 900 <= len(data.fold_split(f).test) <= 1100 and len(data.fold_split(f).partial) == 0
    assert set(data.level_of.tolist()) == {"category_boundary", "sibling_boundary"}


def test_a_fold_too_small_for_any_level_gets_no_proxy_triplets(tmp_path, caplog) -> None:
    """40 demo images in 5 folds: a fold whose 8 images admit no category_boundary or sibling_boundary triplet gets none (a
    warning names it) and the others share its count, instead of failing the run."""
    cfg = parse_config({"root": str(tmp_path), "source": {"limit": 40}, "human": {"proxy_n_triplets": 300}})
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    assert len(data.triplets) == 300
    empty = [f for f in range(5) if len(data.fold_split(f).test) == 0]
    assert empty and "admit none of the levels" in caplog.text
    assert all(len(data.fold_split(f).test) > 0 for f in set(range(5)) - set(empty))

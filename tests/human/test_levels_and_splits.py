"""Abstraction-level triplets on the demo taxonomy, and object-disjoint splits that never share an object."""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.config import parse_config
from alignet_core.errors import InputError
from alignet_core.human.data import load_human_data, taxonomy
from alignet_core.human.levels import LEVELS, check_level, level_triplets
from alignet_core.human.triplets import object_folds, split_by_objects
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
    """A property over many seeds, sizes and fold counts."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_objects = int(rng.integers(6, 400))
        folds = int(rng.integers(3, 8))
        test_fold = int(rng.integers(0, folds))
        val_fold = (test_fold + 1) % folds
        triplets = np.stack([rng.choice(n_objects, 3, replace=False) for _ in range(int(rng.integers(1, 600)))])
        fold_of = object_folds(n_objects, folds, seed=trial)
        assert np.bincount(fold_of, minlength=folds).max() - np.bincount(fold_of, minlength=folds).min() <= 1
        sp = split_by_objects(triplets, fold_of, test_fold, val_fold)
        roles = {name: set(triplets[rows].ravel().tolist()) for name, rows in
                 (("train", sp.train), ("val", sp.val), ("test", sp.test))}
        assert not roles["train"] & roles["val"] and not roles["train"] & roles["test"]
        assert not roles["val"] & roles["test"]
        assert all(fold_of[o] == test_fold for o in roles["test"])
        assert len(sp.train) + len(sp.val) + len(sp.test) + sp.n_mixed == len(triplets)
        assert len(np.intersect1d(sp.train, sp.test)) == 0


def test_the_demo_proxy_is_drawn_inside_each_role(tmp_path) -> None:
    cfg = parse_config({"root": str(tmp_path), "human": {"proxy_n_triplets": 5000, "folds": 5, "test_fold": 2}})
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    sp = data.split
    assert sp.n_mixed == 0 and len(sp.train) + len(sp.val) + len(sp.test) == 5000
    assert set(data.fold_of[data.triplets[sp.test]].ravel().tolist()) == {2}
    assert set(data.fold_of[data.triplets[sp.val]].ravel().tolist()) == {3}
    assert not set(data.fold_of[data.triplets[sp.train]].ravel().tolist()) & {2, 3}
    assert 900 <= len(sp.test) <= 1100  # in proportion to the test fold's objects
    assert set(data.level_of.tolist()) == {"category_boundary", "sibling_boundary"}

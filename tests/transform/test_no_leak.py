"""Nothing held out reaches a fit (issue 30): each fold's fit of the k-fold rotation, run on real torch
code, is bit-identical when everything about the held-out fold's objects is replaced by garbage (their
object embeddings and their images in the local term's pool set to NaN / huge values, their triplets'
response probabilities scrambled) — the transform (μ, σ, W, b), its history, the local-term pool, the
k-NN figure, the search's choice and VICE's fit and training triplets. A perturbation of a *training*
object changes the fit, so the check is not vacuous."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alignet_core.config.human import ViceConfig
from alignet_core.config.transform import TransformConfig
from alignet_core.human.triplets import object_folds
from alignet_core.transform import rotation
from alignet_core.transform.rotation import Problem, fit_fold, pool_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
M, P, FOLDS = 60, 12, 4


def _problem(seed: int = 0) -> Problem:
    """60 objects with a latent similarity the triplets follow, 2 images per object plus 30 images of
    no object in the local term's candidate pool, and proxy-like response probabilities."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(M, 4))
    objects = (latent @ rng.normal(size=(4, P)) + 0.3 * rng.normal(size=(M, P))).astype(np.float32)
    t = np.stack([rng.choice(M, 3, replace=False) for _ in range(3000)])
    s = np.stack([(latent[t[:, a]] * latent[t[:, b]]).sum(1) for a, b in ((0, 1), (0, 2), (1, 2))], 1)
    t = np.take_along_axis(t, np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])[s.argmax(1)], 1)  # odd one last
    probs = np.tile(np.array([[0.8, 0.1, 0.1]], np.float32), (len(t), 1))
    pool_object = np.r_[np.repeat(np.arange(M), 2), np.full(30, -1)]
    pool = np.r_[objects[np.repeat(np.arange(M), 2)] + 0.1 * rng.normal(size=(2 * M, P)),
                 rng.normal(size=(30, P))].astype(np.float32)
    return Problem(objects=objects, triplets=t.astype(np.int64), probs=probs, probs_source=rotation.SOFT_PROXY,
                   fold_of=object_folds(M, FOLDS, seed), pool=pool, pool_object=pool_object.astype(np.int64))


def _garbage(problem: Problem, fold: int, value: float) -> Problem:
    """The problem with every trace of `fold`'s objects replaced: embeddings, their pool images, and the
    response probabilities of every triplet naming one of them."""
    held = problem.fold_of == fold
    objects = problem.objects.copy()
    objects[held] = value
    pool = problem.pool.copy()
    pool[(problem.pool_object >= 0) & held[np.maximum(problem.pool_object, 0)]] = value
    probs = problem.probs.copy()
    probs[held[problem.triplets].any(1)] = [0.0, 0.0, 1.0]
    return dataclasses.replace(problem, objects=objects, pool=pool, probs=probs)


def _same(a: rotation.FoldFit, b: rotation.FoldFit) -> None:
    ta, tb = a.transform, b.transform
    assert (ta.mean, ta.std) == (tb.mean, tb.std)  # standardization: training objects only
    assert np.array_equal(ta.weight, tb.weight) and np.array_equal(ta.bias, tb.bias)
    assert a.result.history == b.result.history and a.result.best_epoch == b.result.best_epoch
    assert np.array_equal(a.pool_rows, b.pool_rows) and a.knn_overlap == b.knn_overlap
    for rows in ("fit_rows", "stop_rows", "test_rows", "partial_rows", "train_objects"):
        assert np.array_equal(getattr(a, rows), getattr(b, rows))


TCFG = TransformConfig(epochs=3, batch_size=256, local_batch=32, alpha=0.25)


@pytest.mark.parametrize("value", [np.nan, 1e30])
def test_a_fold_fit_is_bit_identical_whatever_its_held_out_objects_are(value):
    problem = _problem()
    for fold in range(FOLDS):
        a = fit_fold(problem, fold, TCFG, ViceConfig(), 0, CPU)
        b = fit_fold(_garbage(problem, fold, value), fold, TCFG, ViceConfig(), 0, CPU)
        _same(a, b)
        held = np.flatnonzero(problem.fold_of == fold)
        assert not np.isin(a.train_objects, held).any()
        assert not np.isin(problem.triplets[np.r_[a.fit_rows, a.stop_rows]], held).any()
        assert not np.isin(problem.pool_object[a.pool_rows], held).any()
        expected = problem.objects[a.train_objects].astype(np.float64)
        assert a.transform.mean == float(expected.mean()) and a.transform.std == float(expected.std())
        assert (problem.fold_of[problem.triplets[a.test_rows]] == fold).all() and len(a.test_rows) > 0
        assert a.soft_targets == rotation.SOFT_PROXY


def test_the_search_and_vice_see_only_training_objects():
    problem = _problem(1)
    tcfg = TCFG.model_copy(update={"epochs": 2, "search_alphas": [0.0, 0.5], "search_folds": 2,
                                   "soft_targets": "vice"})
    vcfg = ViceConfig(epochs=3, init_dims=8)
    fold = 2
    a = fit_fold(problem, fold, tcfg, vcfg, 0, CPU)
    b = fit_fold(_garbage(problem, fold, 1e30), fold, tcfg, vcfg, 0, CPU)
    _same(a, b)
    assert a.search is not None and a.search["best"] == b.search["best"]
    assert [r["transformed_mean"] for r in a.search["settings"]] == [r["transformed_mean"] for r in b.search["settings"]]
    assert a.soft_targets == rotation.SOFT_VICE
    assert a.vice.n_objects == len(a.train_objects)  # VICE embeds the training objects only
    assert np.array_equal(a.vice.embedding(), b.vice.embedding()) and a.vice_acc == b.vice_acc
    held = np.flatnonzero(problem.fold_of == fold)
    assert len(a.vice_triplets) == len(a.fit_rows) and not np.isin(a.vice_triplets, held).any()


def test_a_training_object_does_change_the_fit():
    """The check above is not vacuous: the same garbage on one training object changes the fit."""
    problem = _problem()
    fold = 0
    a = fit_fold(problem, fold, TCFG, ViceConfig(), 0, CPU)
    objects = problem.objects.copy()
    objects[np.flatnonzero(problem.fold_of != fold)[0]] += 5.0
    b = fit_fold(dataclasses.replace(problem, objects=objects), fold, TCFG, ViceConfig(), 0, CPU)
    assert a.transform.mean != b.transform.mean and not np.array_equal(a.transform.weight, b.transform.weight)


def test_the_pool_is_chosen_by_ids_and_folds_not_values():
    problem = _problem()
    rows = pool_for(problem, 1, 0, rows=40)
    assert len(rows) == 40 and np.array_equal(rows, pool_for(_garbage(problem, 1, np.nan), 1, 0, rows=40))
    tied = problem.pool_object[rows]
    assert not (problem.fold_of[tied[tied >= 0]] == 1).any()
    assert len(pool_for(problem, None, 0, rows=10_000)) == len(problem.pool)  # the refit may use every image


def test_the_refit_uses_every_triplet_for_the_epochs_it_is_given():
    problem = _problem()
    r = fit_fold(problem, None, TCFG.model_copy(update={"patience": 1}), ViceConfig(), 0, CPU, epochs=4)
    assert np.array_equal(r.fit_rows, np.arange(len(problem.triplets))) and len(r.test_rows) == 0
    assert len(r.result.history) == 4 and r.result.best_epoch == 3  # no early stopping: the last epoch is kept
    assert len(r.train_objects) == M
    assert rotation.refit_epochs([0, 2, 3, 5]) == 4 and rotation.refit_epochs([1]) == 2

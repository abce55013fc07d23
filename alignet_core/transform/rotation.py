"""The k-fold rotation of the transform fit: one fit per held-out fold of objects, and the refit on
every triplet that labels the published dataset.

For fold f (`fit_fold`): the fit sees only the objects outside f. Its triplets are those with no
object in f, split at random by triplet into fitting rows and early-stopping rows
(`transform.val_fraction`, at most `transform.val_max_triplets`); standardization (μ, σ), the
local term's pool of images, any hyper-parameter search, VICE's soft targets and the k-NN
local-structure figure are all computed from the training objects and their images only: the
problem is renumbered to the training objects before any fit, so a held-out object's embedding is
not even an argument of one (`tests/transform/test_no_leak.py` checks it bit for bit). The fit is
then applied to every object and scored on the triplets whose three objects are in f.

The refit (`fit_fold(..., fold=None, epochs=E)`) trains on every triplet and every object, runs the
epoch count the folds chose (no early stopping: its `stop_rows` are only monitored, in-sample) and
uses VICE fitted on every triplet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignet_core.config.human import ViceConfig
from alignet_core.config.transform import TransformConfig
from alignet_core.human import triplets as human
from alignet_core.stats import metrics
from alignet_core.transform.affine import AffineTransform
from alignet_core.transform.fit import FitResult, fit_transform

log = logging.getLogger(__name__)

KNN_K = 10  # neighbours in the transform's local-structure score
KNN_ROWS = 5000  # pool rows it is computed on
POOL_ROWS = 20000  # embeddings the local term is fitted on (a seeded subsample of the training images)

#: provenance of the soft targets, as the metrics name it
SOFT_NONE = "none (hard targets)"
SOFT_GIVEN = "given by the user (human.probabilities): may carry test-fold judgments"
SOFT_PROXY = "the proxy's generator (its response model)"
SOFT_VICE = "VICE fitted here on training objects (each fold's training triplets only)"
SOFT_VICE_ALL = "VICE fitted here on every triplet (the refit on all triplets)"


@dataclass(frozen=True)
class Problem:
    """What the rotation fits on: every object's embedding, the human triplets and the images the
    local term may draw from.

    objects: (m, p) float32 object embeddings; triplets: (t, 3) int64, odd one in column 2; probs:
    (t, 3) response probabilities or None; probs_source: their provenance (SOFT_GIVEN / SOFT_PROXY);
    fold_of: (m,) int64 fold of each object; pool: (N, p) float32 candidate image embeddings of the
    local term; pool_object: (N,) int64 object of each candidate (-1: an image of no object, e.g. an
    ImageNet-like pool image, which no fold holds out)."""

    objects: np.ndarray
    triplets: np.ndarray
    probs: np.ndarray | None
    probs_source: str | None
    fold_of: np.ndarray
    pool: np.ndarray
    pool_object: np.ndarray
    # human.densify (`transform.dense`): the rows each fit trains on (fold f's avoid its objects by
    # construction; None: the refit's) and the rows that may test a fold; None: split `triplets` by objects
    train_rows_of: dict[int | None, np.ndarray] | None = None
    test_pool: np.ndarray | None = None


@dataclass
class FoldFit:
    """One rotation's fit. Row arrays index `Problem.triplets`; `train_objects` are the object ids
    the fit saw (all of them for the refit); `pool_rows` index `Problem.pool`."""

    fold: int | None  # None: the refit on every triplet
    transform: AffineTransform
    result: FitResult
    settings: TransformConfig
    train_objects: np.ndarray
    fit_rows: np.ndarray
    stop_rows: np.ndarray
    test_rows: np.ndarray
    partial_rows: np.ndarray
    pool_rows: np.ndarray
    knn_overlap: float
    soft_targets: str
    vice: Any = None  # the ViceModel when VICE made the soft targets (over the training objects' local ids)
    vice_acc: float | None = None  # its accuracy on the early-stopping rows
    vice_triplets: np.ndarray | None = None  # (., 3) global object ids of the triplets VICE was fitted on
    search: dict[str, Any] | None = None  # grid_search_transform's result, when a search ran
    stop_probs_source: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def pool_for(problem: Problem, fold: int | None, seed: int, rows: int = POOL_ROWS) -> np.ndarray:
    """Sorted rows of `problem.pool` the fit of `fold` may draw on: no image of an object in the fold,
    a seeded subsample of at most `rows` (chosen by ids and folds only, never by the values)."""
    obj = np.asarray(problem.pool_object)
    if fold is None:
        keep = np.arange(len(obj))
    else:
        in_fold = np.zeros(len(obj), dtype=bool)
        tied = obj >= 0
        in_fold[tied] = problem.fold_of[obj[tied]] == fold
        keep = np.flatnonzero(~in_fold)
    if len(keep) > rows:
        keep = np.sort(np.random.default_rng([seed, 41, 0 if fold is None else fold + 1]).choice(keep, rows, replace=False))
    return keep


def _soft_targets(
    problem: Problem, local: np.ndarray, fit_rows: np.ndarray, stop_rows: np.ndarray, n_train_objects: int,
    tcfg: TransformConfig, vcfg: ViceConfig, seed: int, device: torch.device, refit: bool,
) -> tuple[np.ndarray | None, np.ndarray | None, str, Any, float | None]:
    """(fit probs, stop probs, provenance, VICE model, VICE accuracy on the stop rows). `local`: the
    problem's triplets renumbered to the training objects (rows outside the fit are unused)."""
    if tcfg.targets == "hard":
        return None, None, SOFT_NONE, None, None
    if problem.probs is not None and tcfg.soft_targets == "auto":
        return problem.probs[fit_rows], problem.probs[stop_rows], problem.probs_source or SOFT_GIVEN, None, None
    from alignet_core.human import vice

    model = vice.fit_vice(local[fit_rows], n_train_objects, vcfg, seed, device, val=local[stop_rows])
    p_fit = model.predict_probabilities(local[fit_rows], seed=seed)
    acc = metrics.triplet_accuracy(model.predict_probabilities(local[stop_rows], seed=seed))
    # the stop rows are scored on their observed choices: VICE used them for its own early stopping
    return p_fit, None, SOFT_VICE_ALL if refit else SOFT_VICE, model, acc


def fit_fold(
    problem: Problem,
    fold: int | None,
    tcfg: TransformConfig,
    vcfg: ViceConfig,
    seed: int,
    device: torch.device,
    epochs: int | None = None,
) -> FoldFit:
    """Fit the transform with `fold` held out (None: the refit on every triplet, `epochs` passes, no
    early stopping). Everything the fit computes comes from the training objects (see the module
    doc); the returned transform applies to every object."""
    from alignet_core.transform.search import grid_search_transform

    t = np.asarray(problem.triplets, dtype=np.int64)
    m = len(problem.objects)
    fold_seed = seed if fold is None else seed + 7919 * (fold + 1)
    none = np.zeros(0, np.int64)
    if problem.train_rows_of is not None:
        train_objects = np.arange(m) if fold is None else np.flatnonzero(problem.fold_of != fold)
        train_rows, test_rows, partial_rows = problem.train_rows_of[fold], none, none
        if fold is not None:
            if (problem.fold_of[t[train_rows]] == fold).any():
                raise ValueError(f"fold {fold}: a training row names an object of the fold")
            testable = np.asarray(problem.test_pool, dtype=np.int64)
            test_rows = testable[human.split_by_objects(t[testable], problem.fold_of, fold).test]
    elif fold is None:
        train_objects = np.arange(m)
        train_rows, test_rows, partial_rows = np.arange(len(t)), none, none
    else:
        sp = human.split_by_objects(t, problem.fold_of, fold)
        train_objects = np.flatnonzero(problem.fold_of != fold)
        train_rows, test_rows, partial_rows = sp.train, sp.test, sp.partial
    # renumber to the training objects: a held-out object is no argument of any fit below
    local_id = np.full(m, -1, dtype=np.int64)
    local_id[train_objects] = np.arange(len(train_objects))
    local = np.zeros_like(t)
    local[train_rows] = local_id[t[train_rows]]
    objects = np.ascontiguousarray(problem.objects[train_objects])
    fi, si = human.split_triplets(len(train_rows), tcfg.val_fraction, fold_seed, tcfg.val_max_triplets)
    fit_rows, stop_rows = train_rows[fi], train_rows[si]
    if fold is None:  # the refit trains on every triplet; the split's rows are only monitored (in-sample)
        fit_rows = train_rows
    pool_rows = pool_for(problem, fold, seed)
    pool = problem.pool[pool_rows]

    p_fit, p_stop, source, vice_model, vice_acc = _soft_targets(
        problem, local, fit_rows, stop_rows, len(train_objects), tcfg, vcfg, fold_seed, device, fold is None)
    settings, search = tcfg, None
    if tcfg.search_alphas or tcfg.search_lams or tcfg.search_lrs:
        # the search's own cross-validation over the training objects, on the fitting rows
        search = grid_search_transform(
            objects, local[fit_rows], tcfg, tcfg.search_alphas or [tcfg.alpha], tcfg.search_lams or [tcfg.lam],
            tcfg.search_lrs or [tcfg.lr], tcfg.search_folds, fold_seed, device, probs=p_fit,
            min_knn_overlap=tcfg.search_min_knn_overlap,
        )
        settings = tcfg.model_copy(update={k: search["best"][k] for k in ("alpha", "lam", "lr")})
    if epochs is not None:
        settings = settings.model_copy(update={"epochs": int(epochs)})
    result = fit_transform(objects, local[fit_rows], local[stop_rows], settings, fold_seed, device,
                           train_probs=p_fit, val_probs=p_stop, pool=pool, early_stopping=fold is not None)
    rng = np.random.default_rng([seed, 43, 0 if fold is None else fold + 1])
    knn = pool if len(pool) <= KNN_ROWS else pool[np.sort(rng.choice(len(pool), KNN_ROWS, replace=False))]
    mean, std = result.transform.mean, result.transform.std
    knn_overlap = metrics.knn_overlap((knn - mean) / std, result.transform.apply(knn), KNN_K)
    log.info("transform fold %s: %d training objects, %d fitting / %d early-stopping triplets, %d test, %d partial; "
             "best epoch %d", "all" if fold is None else fold, len(train_objects), len(fit_rows), len(stop_rows),
             len(test_rows), len(partial_rows), result.best_epoch)
    return FoldFit(fold=fold, transform=result.transform, result=result, settings=settings,
                   train_objects=train_objects, fit_rows=fit_rows, stop_rows=stop_rows, test_rows=test_rows,
                   partial_rows=partial_rows, pool_rows=pool_rows, knn_overlap=knn_overlap, soft_targets=source,
                   vice=vice_model, vice_acc=vice_acc,
                   vice_triplets=None if vice_model is None else t[fit_rows], search=search)


def refit_epochs(best_epochs: list[int]) -> int:
    """The refit's epoch count: the median over the folds of the number of epochs each fold kept
    (best epoch + 1), rounded up. Passes over the data, not steps: the refit's epochs hold 1/((k−1)/k)³
    times the rows of a fold's, so it takes that many more steps, as a fit on more data should."""
    return max(1, int(np.ceil(np.median(np.asarray(best_epochs) + 1))))

"""Model selection for the stage-1 transform: k-fold cross-validation over objects and a small
grid over (alpha, lam, lr) that reports every setting.

Cross-validation follows the ICLR 2023 protocol (`evaluate.metrics.object_folds`): a fold's test
triplets have all three objects in the held-out fold, its training triplets none; early stopping
uses a random `cfg.val_fraction` of the training triplets, never the test fold.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alignet_core.config.transform import TransformConfig
from alignet_core.errors import InputError
from alignet_core.human.triplets import split_triplets
from alignet_core.stats.metrics import knn_overlap, object_folds, odd_one_out_accuracy
from alignet_core.transform.fit import fit_transform

log = logging.getLogger(__name__)


def cross_validate_transform(
    objects: np.ndarray,
    triplets: np.ndarray,
    cfg: TransformConfig,
    n_folds: int,
    seed: int,
    device: torch.device,
    probs: np.ndarray | None = None,
    knn_k: int = 10,
) -> dict[str, Any]:
    """Fit the transform once per object fold and score it on the fold's test triplets.

    objects: (m, p) float; triplets: (n, 3) int, odd one in column 2; probs: optional (n, 3)
    response probabilities (soft targets). Returns per-fold lists `zero_shot_dot` (dot products of the
    globally standardized embeddings, where the transform starts: not gLocal's cosine protocol),
    `transformed`, `knn_overlap` (objects' k-NN kept by the transform), `n_test`, and their means.
    """
    t = np.asarray(triplets, dtype=np.int64)
    p = None if probs is None else np.asarray(probs)
    z0 = (objects - objects.mean()) / objects.std()
    out: dict[str, list] = {"zero_shot_dot": [], "transformed": [], "knn_overlap": [], "n_test": [], "best_epoch": []}
    for fold, (train_rows, test_rows) in enumerate(object_folds(len(objects), t, n_folds, seed)):
        if len(train_rows) < 2 or len(test_rows) == 0:
            log.warning("transform CV: fold %d has %d train / %d test triplets; skipped", fold, len(train_rows), len(test_rows))
            continue
        fit_rows, stop_rows = split_triplets(len(train_rows), cfg.val_fraction, seed + fold, cfg.val_max_triplets)
        fr, sr = train_rows[fit_rows], train_rows[stop_rows]
        r = fit_transform(
            objects, t[fr], t[sr], cfg, seed + fold, device,
            train_probs=None if p is None else p[fr], val_probs=None if p is None else p[sr],
        )
        after = r.transform.apply(objects)
        out["zero_shot_dot"].append(odd_one_out_accuracy(z0, t[test_rows]))
        out["transformed"].append(odd_one_out_accuracy(after, t[test_rows]))
        out["knn_overlap"].append(knn_overlap(z0, after, knn_k))
        out["n_test"].append(len(test_rows))
        out["best_epoch"].append(r.best_epoch)
    if not out["n_test"]:
        raise InputError("transform CV: no fold had both training and test triplets; use fewer folds or more triplets")
    res: dict[str, Any] = dict(out)
    for key in ("zero_shot_dot", "transformed", "knn_overlap"):
        res[f"{key}_mean"] = float(np.mean(out[key]))
    return res


def grid_search_transform(
    objects: np.ndarray,
    triplets: np.ndarray,
    base: TransformConfig,
    alphas: Sequence[float],
    lams: Sequence[float],
    lrs: Sequence[float],
    n_folds: int,
    seed: int,
    device: torch.device,
    probs: np.ndarray | None = None,
    min_knn_overlap: float | None = None,
) -> dict[str, Any]:
    """Cross-validate every (alpha, lam, lr) setting and report them all.

    Returns {"settings": [one dict per setting: alpha, lam, lr, transformed_mean, zero_shot_dot_mean,
    knn_overlap_mean, per-fold lists], "best": the chosen setting}. The choice is the highest mean
    held-out accuracy among settings whose mean k-NN overlap is at least `min_knn_overlap` (all
    settings when None or when none qualifies).
    """
    rows = []
    for alpha, lam, lr in itertools.product(alphas, lams, lrs):
        cfg = base.model_copy(update={"alpha": float(alpha), "lam": float(lam), "lr": float(lr)})
        cv = cross_validate_transform(objects, triplets, cfg, n_folds, seed, device, probs)
        rows.append({"alpha": float(alpha), "lam": float(lam), "lr": float(lr), **cv})
        log.info("transform grid: alpha=%g lam=%g lr=%g -> acc %.3f, knn %.3f", alpha, lam, lr,
                 cv["transformed_mean"], cv["knn_overlap_mean"])
    return {"settings": rows, "best": choose_setting(rows, min_knn_overlap)}


def choose_setting(rows: Sequence[dict[str, Any]], min_knn_overlap: float | None = None) -> dict[str, Any]:
    """The setting with the highest mean held-out accuracy among those whose mean k-NN overlap is
    at least `min_knn_overlap` (all rows when None or when none qualifies)."""
    if not rows:
        raise InputError("transform grid: no setting to choose from; give at least one alpha, lam and lr")
    pool = list(rows)
    if min_knn_overlap is not None:
        pool = [r for r in rows if r["knn_overlap_mean"] >= min_knn_overlap] or pool
    best = max(pool, key=lambda r: r["transformed_mean"])
    return {k: best[k] for k in ("alpha", "lam", "lr", "transformed_mean", "knn_overlap_mean")}

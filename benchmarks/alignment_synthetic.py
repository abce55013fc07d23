"""Stage 1 on synthetic data (`python -m benchmarks.alignment [--quick]`): VICE and the gLocal transform
against the sparse non-negative embedding that generated the "human" triplets (`alignet_core.synthetic`),
on held-out triplets (`run`) and on held-out objects (`_object_disjoint`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from alignet_core.config.transform import TransformConfig
from alignet_core.config.human import ViceConfig
from alignet_core.stats import bootstrap
from alignet_core.stats.metrics import (
    choice_nll,
    choice_probabilities_from_embeddings,
    expected_calibration_error,
    knn_overlap,
    linear_probe,
    odd_one_out_accuracy,
    odd_one_out_correct,
    triplet_accuracy,
)
from alignet_core.synthetic import ceiling_accuracy, make_synthetic_human
from alignet_core.human import triplets as human
from alignet_core.transform.fit import fit_transform
from alignet_core.human.triplets import split_triplets
from alignet_core.human.vice import fit_vice

CPU = torch.device("cpu")


def linear_oracle_accuracy(features: np.ndarray, embedding: np.ndarray, triplets: np.ndarray) -> float:
    """Held-out accuracy of the best affine readout of the generating embedding from the teacher's
    features, fitted by least squares with the embedding known (an oracle no triplet-trained
    transform has): how much of the human space a linear map can recover from this teacher."""
    f = np.c_[features, np.ones(len(features))]
    b, *_ = np.linalg.lstsq(f, embedding, rcond=None)
    return odd_one_out_accuracy(f @ b, triplets)


def _object_disjoint(data: Any, vcfg: ViceConfig, tcfg: TransformConfig, seed: int) -> dict:
    """The same claims on triplets whose three objects were all held out of every fit: objects in 5
    folds (fold 0 test, early stopping on a triplet split of the other folds' triplets), VICE and the
    transform fitted on the training objects' triplets only; accuracies with object-bootstrap 95% intervals. The linear
    oracle's readout is fitted on the training objects only."""
    x, t = data.features, data.triplets
    fold_of = human.object_folds(data.n_objects, 5, seed)
    sp = human.split_by_objects(t, fold_of, test_fold=0)
    fi, si = human.split_triplets(len(sp.train), tcfg.val_fraction, seed, tcfg.val_max_triplets)
    train, val, test = t[sp.train[fi]], t[sp.train[si]], t[sp.test]
    vice = fit_vice(train, data.n_objects, vcfg, seed, CPU)
    fit = fit_transform(x, train, val, tcfg, seed, CPU, vice.predict_probabilities(train, n_samples=25, seed=seed))
    train_objects = np.flatnonzero(fold_of != 0)
    f = np.c_[x, np.ones(len(x))]
    b, *_ = np.linalg.lstsq(f[train_objects], data.embedding[train_objects], rcond=None)
    z0 = (x - x.mean()) / x.std()
    ceiling = (np.asarray(data.probs)[sp.test].argmax(1) == 0)

    def est(correct: np.ndarray) -> dict:
        return bootstrap.accuracy(correct, seed, triplets=test).model_dump()

    return {
        "n_objects_test": int((fold_of == 0).sum()),
        "n_test_triplets": int(len(test)),
        "n_train_triplets": int(len(train)),
        "n_dropped_mixed": sp.n_mixed,
        "ceiling": est(ceiling),
        "zero_shot_cosine": est(odd_one_out_correct(x, test, "cosine")),
        "zero_shot_dot": est(odd_one_out_correct(z0, test, "dot")),
        "linear_oracle": est(odd_one_out_correct(f @ b, test, "dot")),
        "transformed": est(odd_one_out_correct(fit.transform.apply(x), test, "dot")),
        "gain": bootstrap.paired_difference(odd_one_out_correct(x, test, "cosine"),
                                            odd_one_out_correct(fit.transform.apply(x), test, "dot"), seed,
                                            triplets=test).model_dump(),
        "best_epoch": fit.best_epoch,
    }


def run(quick: bool, seed: int = 0) -> dict:
    t_all = time.perf_counter()
    n_triplets = 20000 if quick else 60000
    data = make_synthetic_human(n_objects=150, n_triplets=n_triplets, seed=seed)
    x, t = data.features, data.triplets
    tr, va = split_triplets(len(t), 0.1, seed)
    train, val = t[tr], t[va]

    vcfg = ViceConfig(epochs=60 if quick else 150, lr=0.03 if quick else 0.01, batch_size=512)
    t0 = time.perf_counter()
    vice = fit_vice(train, data.n_objects, vcfg, seed, CPU)
    vice_s = time.perf_counter() - t0
    p_train = vice.predict_probabilities(train, n_samples=25, seed=seed)
    p_val = vice.predict_probabilities(val, n_samples=25, seed=seed + 1)

    base = dict(lr=1e-2, epochs=25, batch_size=256, local_batch=150, lam=1e-3, patience=6)
    alpha = 0.05
    knn_k = 10
    z0 = (x - x.mean()) / x.std()
    fits = {}
    t0 = time.perf_counter()
    # early stopping on a slice of the training triplets, never on the reported held-out ones
    fit_rows, stop_rows = split_triplets(len(train), 0.1, seed + 1)
    runs = [("soft_local", "soft", alpha), ("hard_local", "hard", alpha), ("soft_global", "soft", 0.0),
            ("soft_local_0.25", "soft", 0.25)]
    for name, targets, a in runs:
        cfg = TransformConfig(targets=targets, alpha=a, **base)
        fits[name] = fit_transform(
            x, train[fit_rows], train[stop_rows], cfg, seed, CPU, p_train[fit_rows], p_train[stop_rows]
        )
    transform_s = time.perf_counter() - t0

    def held_out(name: str) -> np.ndarray:
        return choice_probabilities_from_embeddings(fits[name].transform.apply(x), val)

    q_soft, q_hard = held_out("soft_local"), held_out("hard_local")
    object_disjoint = _object_disjoint(data, vcfg, TransformConfig(targets="soft", alpha=alpha, **base), seed)
    t0 = time.perf_counter()
    probe = linear_probe(x, t, n_folds=3, epochs=10, seed=seed)
    probe_s = time.perf_counter() - t0
    result = {
        "benchmark": "alignment_quick" if quick else "alignment",
        "object_disjoint": object_disjoint,
        "triplet_split_note": "the figures below hold out 10% of the triplets; every object was fitted",
        "ceiling_acc": ceiling_accuracy(data.probs[va]),
        "zero_shot_acc": odd_one_out_accuracy(z0, val),
        "linear_oracle_acc": linear_oracle_accuracy(x, data.embedding, val),
        "transformed_acc": odd_one_out_accuracy(fits["soft_local"].transform.apply(x), val),
        "transformed_acc_hard": odd_one_out_accuracy(fits["hard_local"].transform.apply(x), val),
        "transformed_acc_global_only": odd_one_out_accuracy(fits["soft_global"].transform.apply(x), val),
        "vice_acc": triplet_accuracy(p_val),
        "vice_dims": vice.dim,
        "true_dims": int(data.embedding.shape[1]),
        "knn_overlap_global_only": knn_overlap(z0, fits["soft_global"].transform.apply(x), knn_k),
        "knn_overlap_with_local": knn_overlap(z0, fits["soft_local"].transform.apply(x), knn_k),
        "knn_k": knn_k,
        "alpha_0.25": {
            "transformed_acc": odd_one_out_accuracy(fits["soft_local_0.25"].transform.apply(x), val),
            "knn_overlap": knn_overlap(z0, fits["soft_local_0.25"].transform.apply(x), knn_k),
        },
        "calibration": {
            "nll_soft": choice_nll(q_soft),
            "nll_hard": choice_nll(q_hard),
            "ece_soft": expected_calibration_error(q_soft),
            "ece_hard": expected_calibration_error(q_hard),
            "nll_vice": choice_nll(p_val),
            "nll_generating_model": choice_nll(data.probs[va]),
        },
        "probe": {"zero_shot_mean": probe["zero_shot_mean"], "probed_mean": probe["probed_mean"], "n_folds": 3},
        "settings": {
            "n_objects": data.n_objects,
            "n_triplets": n_triplets,
            "feature_dim": int(x.shape[1]),
            "held_out": int(len(val)),
            "vice": vcfg.model_dump(),
            "transform": base | {"alpha_local": alpha, "tau": 0.1},
            "seed": seed,
        },
        "seconds": {
            "vice": round(vice_s, 1),
            "transform_4_fits": round(transform_s, 1),
            "probe": round(probe_s, 1),
            "total": round(time.perf_counter() - t_all, 1),
        },
    }
    return result

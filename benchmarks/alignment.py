"""Synthetic proof of stage 1: VICE and the gLocal transform against a known generating model.

    python -m benchmarks.alignment --quick

Generates synthetic "human" triplets from a sparse non-negative embedding (`alignet_core.synthetic`),
holds out 10% of the triplets, then measures on them: the generating model's own accuracy
(ceiling), the teacher zero-shot, VICE fitted on the training triplets, the transform fitted
with VICE's posterior-predictive probabilities as soft targets (uncertainty distillation) and
with hard targets, the k-NN overlap of the objects before/after a global-only vs a gLocal fit,
and calibration (NLL / ECE of the held-out choices) of soft vs hard targets. Prints one JSON line
and writes benchmarks/results/alignment_quick.json (or alignment.json without --quick).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from alignet_core.config import TransformConfig, ViceConfig
from alignet_core.evaluate import (
    choice_nll,
    choice_probabilities_from_embeddings,
    expected_calibration_error,
    knn_overlap,
    linear_probe,
    odd_one_out_accuracy,
)
from alignet_core.human import split_triplets
from alignet_core.synthetic import ceiling_accuracy, make_synthetic_human
from alignet_core.transform import fit_transform
from alignet_core.vice import fit_vice
from benchmarks._machine import machine_info, write_result

CPU = torch.device("cpu")


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
    t0 = time.perf_counter()
    probe = linear_probe(x, t, n_folds=3, epochs=10, seed=seed)
    probe_s = time.perf_counter() - t0
    result = {
        "benchmark": "alignment_quick" if quick else "alignment",
        "ceiling_acc": ceiling_accuracy(data.probs[va]),
        "zero_shot_acc": odd_one_out_accuracy(z0, val),
        "transformed_acc": odd_one_out_accuracy(fits["soft_local"].transform.apply(x), val),
        "transformed_acc_hard": odd_one_out_accuracy(fits["hard_local"].transform.apply(x), val),
        "transformed_acc_global_only": odd_one_out_accuracy(fits["soft_global"].transform.apply(x), val),
        "vice_acc": float(np.mean((p_val[:, 0] > p_val[:, 1]) & (p_val[:, 0] > p_val[:, 2]))),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic problem (a few minutes on a laptop CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared CPU
    try:
        result = run(args.quick, args.seed)
    finally:
        torch.set_num_threads(threads)
    result["machine"] = machine_info()
    write_result(result["benchmark"], result)


if __name__ == "__main__":
    main()

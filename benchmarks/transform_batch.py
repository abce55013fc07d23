"""Does a larger transform batch make the fit cheaper at equal quality? (issue 33: the fit at scale)

    python -m benchmarks.transform_batch [--settings 1024:0.003 4096:0.003 4096:0.006 8192:0.006 8192:0.012]
    python -m benchmarks.transform_batch --quick     # a small problem: checks the code, not a result

A step of the transform fit multiplies every distinct object of its batch by W (forward and gradient): with
1,483 training objects and 1,024 triplets a step already touches ~1,300 of them, so an epoch costs about
steps × m × p² whatever the batch, and a batch 4–8× larger would cut an epoch's work 3–6×
(`benchmarks.roofline`, `transform_other_model`). Whether the fit still gets as far is the question.

The problem is the scale benchmark's (`benchmarks.scale_data`: 1,854 objects of 4 images, p = 1,280, 100k
human-like triplets with choice probabilities from a known human latent), fold 0 of 5 held out, fitted by the
pipeline's own `transform.rotation.fit_fold` (early stopping, the local term on the images, the configured 8
epochs at most) for each (batch size, learning rate) setting. Each fit is scored where the answer is known:
20,000 fresh triplets of fold-0 objects (no fit saw them), the expected accuracy Σ p_true[model's choice]
under the generator's probabilities, beside the zero-shot embedding's and the ceiling (always choosing the
likeliest pair). Also its wall seconds (on a shared 2-core machine: compare within the run), epochs run,
best epoch, held-out (early-stopping) loss and the k-NN overlap it kept. Writes results/transform_batch.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from alignet_core.stats.metrics import expected_agreement, pair_similarities
from benchmarks._machine import machine_info, write_result

DEFAULT_SETTINGS = ["1024:0.003", "4096:0.003", "4096:0.006", "8192:0.006", "8192:0.012"]
N_TEST = 20_000


def problem_and_truth(spec: Any, folds: int, seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """(the rotation's Problem over the generated data, N_TEST fresh triplets of fold-0 objects, their true
    pair probabilities (N_TEST, 3) [p01, p02, p12] under the generator's human latent)."""
    from alignet_core.human.triplets import object_folds
    from alignet_core.transform.rotation import SOFT_GIVEN, Problem
    from benchmarks.scale_data import group_labels, human_latent, human_triplets, object_images, rows

    x = rows(spec, 0, spec.n).astype(np.float32)
    imgs = object_images(spec, group_labels(spec))
    objects = x[imgs].mean(1)
    t, probs = human_triplets(spec)
    fold_of = object_folds(spec.n_objects, folds, seed)
    object_of_row = np.full(spec.n, -1)
    object_of_row[imgs.ravel()] = np.repeat(np.arange(spec.n_objects), imgs.shape[1])
    problem = Problem(objects=objects, triplets=t, probs=probs, probs_source=SOFT_GIVEN, fold_of=fold_of, pool=x,
                      pool_object=object_of_row)
    h = human_latent(spec)
    held = np.flatnonzero(fold_of == 0)
    rng = np.random.default_rng([seed, 5])
    test = np.stack([rng.choice(held, 3, replace=False) for _ in range(N_TEST)])
    sims = spec.human_beta * pair_similarities(h, test)
    p_true = np.exp(sims - sims.max(1, keepdims=True))
    return problem, test, p_true / p_true.sum(1, keepdims=True)


def expected_accuracy(z: np.ndarray, test: np.ndarray, p_true: np.ndarray) -> float:
    """Mean true probability of the pair the embedding z judges most similar (`stats.metrics.expected_agreement`)."""
    return float(expected_agreement(pair_similarities(z, test), p_true).mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from alignet_core.config.human import ViceConfig
    from alignet_core.config.transform import TransformConfig
    from alignet_core.transform.rotation import fit_fold
    from benchmarks.scale_data import ScaleSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="batch_size:lr pairs")
    ap.add_argument("--quick", action="store_true", help="400 objects, p = 64, 8k triplets, 2 epochs")
    ap.add_argument("--no-write", action="store_true", help="return the result without writing it (tests)")
    args = ap.parse_args(argv)
    spec = (ScaleSpec(n=4000, dim=64, groups=100, supers=10, n_objects=400, n_triplets=8000) if args.quick
            else ScaleSpec(n=20_000))
    problem, test, p_true = problem_and_truth(spec, folds=5, seed=0)
    rows = []
    for setting in args.settings:
        batch, lr = setting.split(":")
        tcfg = TransformConfig(batch_size=int(batch), lr=float(lr), epochs=2 if args.quick else 8)
        t0 = time.perf_counter()
        ff = fit_fold(problem, 0, tcfg, ViceConfig(), 0, torch.device("cpu"))
        seconds = time.perf_counter() - t0
        tr = ff.transform
        rows.append({
            "batch_size": int(batch), "lr": float(lr), "seconds": round(seconds, 1),
            "epochs_run": len(ff.result.history), "best_epoch": ff.result.best_epoch,
            "stop_loss": round(ff.result.val_loss_after, 4), "knn_overlap": round(ff.knn_overlap, 3),
            "expected_accuracy": round(expected_accuracy(tr.apply(problem.objects), test, p_true), 4),
        })
        print(rows[-1], flush=True)
    zero = expected_accuracy((problem.objects - tr.mean) / tr.std, test, p_true)
    base = rows[0]
    for r in rows:
        r["seconds_vs_first"] = round(r["seconds"] / base["seconds"], 3)
    result = {
        "benchmark": "transform_batch",
        "what": "fold 0 of the scale benchmark's human data fitted at each (batch size, lr); expected accuracy on "
                f"{N_TEST:,} fresh triplets of held-out objects under the generator's probabilities",
        "data": {"n_objects": spec.n_objects, "dim": spec.dim, "n_triplets": spec.n_triplets, "folds": 5},
        "zero_shot_expected_accuracy": round(zero, 4),
        "ceiling": round(float(p_true.max(1).mean()), 4),
        "fits": rows,
        "machine": machine_info(),
    }
    if not args.no_write:
        write_result("transform_batch_quick" if args.quick else "transform_batch", result)
    return result


if __name__ == "__main__":
    main()

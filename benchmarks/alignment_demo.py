"""Stage 1 on the demo teacher and its taxonomy proxy triplets (`python -m benchmarks.alignment --demo`,
`run_demo`), and what the proxy's mix of levels does to each level's figures (`--mixes`, `run_mixes`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from alignet_core.config import PipelineConfig, parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.embed.stage import run_embed
from alignet_core.human import triplets as human
from alignet_core.config.human import ViceConfig
from alignet_core.human.data import load_human_data
from alignet_core.human.triplets import split_triplets
from alignet_core.human.vice import ViceModel, fit_vice
from alignet_core.io import embedding_store, sources
from alignet_core.stats import bootstrap
from alignet_core.stats.metrics import (
    choice_nll,
    choice_probabilities_from_embeddings,
    expected_calibration_error,
    knn_overlap,
    odd_one_out_accuracy,
    odd_one_out_correct,
    triplet_accuracy,
)
from alignet_core.synthetic import ceiling_accuracy
from alignet_core.config.transform import TransformConfig
from alignet_core.transform.fit import FitResult, fit_transform

CPU = torch.device("cpu")
DEMO_ROOT = "/tmp/alignet-bench-root"
# VICE on the demo: the documented fast setting (ViceConfig.fast(): full-batch steps, stop when the
# pruned dimensionality is stable); the reference's defaults (batches of 128, up to 2,000 epochs) take
# hours on a CPU.
DEMO_VICE_EPOCHS = ViceConfig.fast().epochs
# The demo transform's 8 epochs stop while the held-out loss still falls; a second pair of fits
# with this many epochs (0: skip) shows where the same settings converge.
DEMO_LONGER_EPOCHS = 30


def demo_teacher(cfg: PipelineConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The demo teacher's embeddings, computed once by `run_embed` and cached under cfg.root.

    Returns (embeddings (n, p) float32, valid (n,) bool, the embed stage's metrics plus the seconds
    this call took, i.e. ~0 when the store was already cached).
    """
    t0 = time.perf_counter()
    out = run_embed(RunContext.of(cfg))
    g = embedding_store.open_embeddings(out.artifact)
    emb = np.asarray(g["embeddings"][:], dtype=np.float32)
    valid = np.asarray(g["valid"][:], dtype=bool)
    return emb, valid, {**out.metrics.model_dump(mode="json"), "artifact": out.artifact, "seconds_this_call": round(time.perf_counter() - t0, 1)}


def _fit_demo(
    objects: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    train_probs: np.ndarray | None,
    val_probs: np.ndarray | None,
    cfg: TransformConfig,
    seed: int,
    pool: np.ndarray,
) -> FitResult:
    """fit_transform on the training objects' triplets, early-stopping on the validation fold's:
    the reported test-fold triplets are never seen by a fit."""
    return fit_transform(objects, train, val, cfg, seed, CPU, train_probs, val_probs, pool=pool)


def run_demo(
    root: str = DEMO_ROOT, vice_epochs: int = DEMO_VICE_EPOCHS, seed: int | None = None, longer_epochs: int = DEMO_LONGER_EPOCHS
) -> dict:
    """Stage-1 claims on the demo teacher and its taxonomy proxy triplets.

    Held-out = the transform stage's test fold (`human.folds`: objects never fitted; early stopping on
    the validation fold). Measures: the proxy's own ceiling (argmax of the generating probabilities), the
    standardized teacher zero-shot, VICE fitted on the training split, the demo transform fitted
    with hard targets, soft proxy targets and soft VICE targets, their held-out NLL / ECE, and the
    k-NN overlap (teacher vs transformed objects) of a global-only fit (alpha 0) vs the demo's
    gLocal fit (cfg.transform.alpha). With longer_epochs > 0, the hard and soft-proxy fits are
    repeated with that many epochs (same early stopping) to tell an unconverged fit from a limit
    of the affine map.
    """
    t_all = time.perf_counter()
    cfg = with_overrides(parse_config({}), {"root": root} | ({} if seed is None else {"seed": seed}))
    seed = cfg.seed
    emb, valid, embed_info = demo_teacher(cfg)
    t_data = time.perf_counter()
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    if data.probs is None:
        raise RuntimeError("the demo proxy returned no generating probabilities")
    objects = human.object_embeddings(emb, np.where(valid, data.object_of_image, -1), data.n_objects)
    held_objects = np.flatnonzero(data.fold_of == cfg.human.test_fold)
    pool = emb[np.flatnonzero(valid & ~np.isin(data.object_of_image, held_objects))]  # as the test fold's pool
    t = data.triplets
    # the test fold's rotation of run_transform: early stopping on a triplet split of its training rows
    fit_i, stop_i = split_triplets(len(data.split.train), cfg.transform.val_fraction, seed + 7919 * (cfg.human.test_fold + 1),
                                   cfg.transform.val_max_triplets)
    tr, vl, va = data.split.train[fit_i], data.split.train[stop_i], data.split.test
    train, val = t[tr], t[va]
    vice_fit, vice_check = split_triplets(len(tr), cfg.transform.val_fraction, seed)  # VICE sees training objects only
    data_s = time.perf_counter() - t_data

    vcfg = ViceConfig.fast(epochs=vice_epochs)
    t0 = time.perf_counter()
    vice: ViceModel = fit_vice(train[vice_fit], data.n_objects, vcfg, seed, CPU)
    vice_s = time.perf_counter() - t0
    p_train = vice.predict_probabilities(train, n_samples=25, seed=seed)
    p_vice_check = vice.predict_probabilities(train[vice_check], n_samples=25, seed=seed + 1)

    tcfg = cfg.transform
    runs = {
        "hard": (tcfg.model_copy(update={"targets": "hard"}), None),
        "soft_proxy": (tcfg.model_copy(update={"targets": "soft"}), data.probs[tr]),
        "soft_vice": (tcfg.model_copy(update={"targets": "soft"}), p_train),
        "soft_proxy_global_only": (tcfg.model_copy(update={"targets": "soft", "alpha": 0.0}), data.probs[tr]),
    }
    fits: dict[str, FitResult] = {}
    fit_s: dict[str, float] = {}
    for name, (c, probs) in runs.items():
        t0 = time.perf_counter()
        fits[name] = _fit_demo(objects, train, t[vl], probs, None if probs is p_train or probs is None
                               else data.probs[vl], c, seed, pool)
        fit_s[name] = round(time.perf_counter() - t0, 1)
    if longer_epochs > 0:
        for name in ("hard", "soft_proxy"):
            c, probs = runs[name]
            t0 = time.perf_counter()
            fits[f"{name}_longer"] = _fit_demo(objects, train, t[vl], probs, None if probs is None else data.probs[vl],
                                               c.model_copy(update={"epochs": longer_epochs}), seed, pool)
            fit_s[f"{name}_longer"] = round(time.perf_counter() - t0, 1)
    after = {name: f.transform.apply(objects) for name, f in fits.items()}
    q = {name: choice_probabilities_from_embeddings(z, val, tcfg.temperature) for name, z in after.items()}
    z0 = ((objects.astype(np.float64) - objects.mean()) / objects.std()).astype(np.float32)
    knn_k = 10
    local_name = "soft_proxy" if tcfg.targets == "soft" else "hard"

    return {
        "benchmark": "alignment_demo",
        "human_data": "taxonomy proxy (not human)" if data.is_proxy else cfg.human.triplets,
        "ceiling_acc": ceiling_accuracy(data.probs[va]),
        "held_out": "the test fold: objects no fit saw (human.folds); intervals resample its objects",
        "zero_shot_acc": odd_one_out_accuracy(z0, val),
        "zero_shot_cosine": bootstrap.accuracy(odd_one_out_correct(objects, val, "cosine"), seed, val).model_dump(),
        "transformed": {name: bootstrap.accuracy(odd_one_out_correct(z, val), seed, val).model_dump()
                        for name, z in after.items()},
        "vice_acc_training_objects": triplet_accuracy(p_vice_check),
        "vice_dims": vice.dim,
        "transformed_acc_hard": odd_one_out_accuracy(after["hard"], val),
        "transformed_acc_soft_proxy": odd_one_out_accuracy(after["soft_proxy"], val),
        "transformed_acc_soft_vice": odd_one_out_accuracy(after["soft_vice"], val),
        "transformed_acc_global_only": odd_one_out_accuracy(after["soft_proxy_global_only"], val),
        "knn_overlap_global_only": knn_overlap(z0, after["soft_proxy_global_only"], knn_k),
        "knn_overlap_with_local": knn_overlap(z0, after[local_name], knn_k),
        "knn_k": knn_k,
        "calibration": {
            **{f"nll_{name}": choice_nll(q[name]) for name in ("hard", "soft_proxy", "soft_vice")},
            **{f"ece_{name}": expected_calibration_error(q[name]) for name in ("hard", "soft_proxy", "soft_vice")},
            "nll_generating_model": choice_nll(data.probs[va]),
            "ece_generating_model": expected_calibration_error(data.probs[va]),
            "mean_p_chosen": {name: float(q[name][:, 0].mean()) for name in q}
            | {"generating_model": float(data.probs[va][:, 0].mean())},
        },
        "longer_fit": {
            name: {
                "epochs": longer_epochs,
                "acc": odd_one_out_accuracy(after[f"{name}_longer"], val),
                "nll": choice_nll(q[f"{name}_longer"]),
                "ece": expected_calibration_error(q[f"{name}_longer"]),
                "knn_overlap": knn_overlap(z0, after[f"{name}_longer"], knn_k),
            }
            for name in ("hard", "soft_proxy")
        }
        if longer_epochs > 0
        else None,
        "fits": {
            name: {
                "best_epoch": f.best_epoch,
                "epochs_run": len(f.history),
                "train_acc": f.train_acc_after,
                "validation_fold_acc": f.history[f.best_epoch]["val_acc"] if f.best_epoch >= 0 else None,
            }
            for name, f in fits.items()
        },
        "vice_history_last": vice.info["history"][-1],
        "settings": {
            "config": "parse_config({}) (the demo defaults) with root overridden",
            "model": cfg.embed.model,
            "weights": cfg.embed.weights,
            "n_images": int(len(emb)),
            "n_valid": int(valid.sum()),
            "feature_dim": int(emb.shape[1]),
            "n_objects": data.n_objects,
            "n_triplets": int(len(t)),
            "n_train": int(len(tr)),
            "held_out": int(len(va)),
            "proxy": {"mix": cfg.human.proxy_mix, "noise": cfg.human.proxy_noise},
            "split": f"objects in {cfg.human.folds} folds (seed {seed}): test fold {cfg.human.test_fold}, as that fold's "
            "rotation in run_transform",
            "early_stopping": "a triplet split of the training objects' triplets (transform.val_fraction); VICE is fitted on the training objects' triplets and "
            "checked on held-out triplets of those objects (it has no embedding for unseen objects)",
            "vice": vcfg.model_dump() | {"posterior_samples": 25},
            "transform": tcfg.model_dump(),
            "global_only_alpha": 0.0,
            "local_pool": f"the {len(pool)} valid images of training objects (as run_transform)",
            "knn": f"cosine k={knn_k}, standardized teacher objects vs transformed objects; with_local = "
            f"the {local_name} fit at alpha {tcfg.alpha}",
            "threads": torch.get_num_threads(),
            "seed": seed,
        },
        "seconds": {
            "embed_cache": embed_info["seconds_this_call"],
            "embed_first_run": embed_info.get("seconds"),
            "load_data": round(data_s, 1),
            "vice": round(vice_s, 1),
            "transform_fits": fit_s,
            "total": round(time.perf_counter() - t_all, 1),
        },
    }


#: proxy mixes compared by `--mixes`: one level alone, the default half category_boundary / half sibling_boundary
#: (named global / local before issue 30; benchmarks/results/alignment_mixes.json still has the old names), and a
#: mix like the earlier single-level proxy (same-class pairs; odd ones from sibling or any classes)
MIXES = {
    "category_boundary": {"category_boundary": 1.0},
    "sibling_boundary": {"sibling_boundary": 1.0},
    "class_boundary": {"class_boundary": 1.0},
    "category_boundary+sibling_boundary (default)": {"category_boundary": 0.5, "sibling_boundary": 0.5},
    "sibling_boundary+class_boundary": {"sibling_boundary": 0.5, "class_boundary": 0.5},
}


def run_mixes(root: str = DEMO_ROOT, seed: int | None = None) -> dict:
    """What the proxy's level mix does to each level's figures: for each mix in `MIXES`, the demo
    transform stage fitted on proxy triplets of that mix (`run_transform`), then the evaluation
    stage's teacher rows (raw vs aligned) at every level and on the mix's own test-fold triplets,
    all on held-out objects with object-bootstrap 95% intervals."""
    from alignet_core.evaluate.stage import run_evaluate
    from alignet_core.transform.stage import run_transform

    t_all = time.perf_counter()
    base = with_overrides(parse_config({}), {"root": root, "distill.enabled": False}
                          | ({} if seed is None else {"seed": seed}))
    emb = run_embed(RunContext.of(base))
    out: dict[str, Any] = {"benchmark": "alignment_mixes", "human_data": "taxonomy proxy (not human)", "mixes": {}}
    for name, mix in MIXES.items():
        cfg = with_overrides(base, {"human.proxy_mix": mix})
        t0 = time.perf_counter()
        tfm = run_transform(RunContext.of(cfg), emb)
        ev = run_evaluate(RunContext.of(cfg), emb, tfm, None).metrics
        h = tfm.metrics.heldout
        out["mixes"][name] = {
            "mix": mix,
            "test_fold_proxy": {"zero_shot": h.zero_shot.model_dump(), "transformed": h.transformed.model_dump(),
                                "gain": h.gain.model_dump()},
            "levels_raw": {k: v.model_dump() for k, v in ev.scores["teacher_raw"].items() if k not in ("human", "proxy")},
            "levels_aligned": {k: v.model_dump() for k, v in ev.scores["teacher_aligned"].items() if k not in ("human", "proxy")},
            "levels_change": {k: v.model_dump() for k, v in ev.changes["teacher"].items() if k not in ("human", "proxy")},
            "best_epoch": tfm.metrics.best_epoch, "epochs_run": tfm.metrics.epochs_run,
            "train_acc_after": tfm.metrics.train_acc_after,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    out["settings"] = {"config": "the demo config, distill disabled", "seed": base.seed, "folds": base.human.folds,
                       "n_per_level": base.evaluate.n_per_level}
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    return out


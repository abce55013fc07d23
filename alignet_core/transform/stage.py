"""Stage 1, transform: fit the human-aligned affine transform of the teacher on odd-one-out triplets
(gLocal; soft "uncertainty distillation" targets) and apply it to the store chunk by chunk.

In: the embed stage's store and the human triplets (`human`; the demo's taxonomy proxy without
them). Out: `<dir>/transformed.zarr` (raw float32, read whole by clustering and every sampling
shard), `transform.safetensors` (the fit, with its metrics), the triplets it used and, when VICE
made the soft targets, `vice.safetensors`. With `transform.enabled` false the output is the
untransformed store. A run killed after the fit was saved resumes with that fit (it is not
refitted), so every chunk of the transformed store comes from one transform.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from alignet_core.config import PipelineConfig, TransformConfig
from alignet_core.evaluate import metrics
from alignet_core.hardware import resolve_device
from alignet_core.io import embedding_store, formats, sources, store
from alignet_core.pipeline.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage, reuse
from alignet_core.transform import human, vice
from alignet_core.transform.affine import AffineTransform, apply_transform_to_store, load_saved_fit
from alignet_core.transform.fit import fit_transform
from alignet_core.transform.human_data import HumanData, load_human_data
from alignet_core.transform.search import grid_search_transform

log = logging.getLogger(__name__)

KNN_K = 10  # neighbours in the transform's local-structure score
KNN_ROWS = 5000  # pool rows it is computed on
POOL_ROWS = 20000  # embeddings the local term is fitted on (a seeded subsample of the valid rows)
STORE = "transformed.zarr"
FIT_FILE = "transform.safetensors"


class FitSettings(Record):
    """The transform hyper-parameters a fit used (the configured ones, or a search's choice)."""

    targets: str
    alpha: float
    lam: float
    lr: float
    optimizer: str
    epochs: int
    batch_size: int
    tau: float
    temperature: float


class ViceSummary(Record):
    """VICE's held-out accuracy and kept dimensions, when VICE made the soft targets."""

    val_acc: float
    dims: int


class SearchSetting(Record):
    alpha: float
    lam: float
    lr: float
    transformed_mean: float
    zero_shot_mean: float
    knn_overlap_mean: float


class SearchSummary(Record):
    """Every setting a cross-validated search over objects tried, and the one chosen."""

    n_folds: int
    settings: list[SearchSetting]
    best: dict[str, float]


class TransformMetrics(StageMetrics):
    """Held-out odd-one-out accuracy before/after the transform and how the fit was made; only
    `enabled` and `seconds` when the transform is off."""

    enabled: bool
    human_data: str | None = None
    n_triplets: int | None = None
    n_train: int | None = None
    n_heldout: int | None = None
    acc_before: float | None = None
    acc_after: float | None = None
    train_acc_after: float | None = None
    best_epoch: int | None = None
    knn_k: int | None = None
    knn_overlap: float | None = None
    soft_targets: str | None = None
    hyperparameters: FitSettings | None = None
    history: list[dict[str, float]] = []
    vice: ViceSummary | None = None
    search: SearchSummary | None = None


class TransformOutput(StageOutput):
    metrics: TransformMetrics


def plan_transform(cfg: PipelineConfig, emb: StageOutput) -> StagePlan:
    conf: dict[str, Any] = {"transform": cfg.transform.model_dump(), "human": cfg.human.model_dump(), "seed": cfg.seed,
                            "device": resolve_device(cfg.device).type}
    if cfg.human.triplets:
        conf["human_sha256"] = store.file_sha256(cfg.human.triplets)
    if cfg.transform.targets == "soft":
        conf["vice"] = cfg.vice.model_dump()
    return plan_stage(cfg.root, "transform", conf, [emb.key], __name__)


def run_transform(cfg: PipelineConfig, emb: StageOutput) -> TransformOutput:
    """Fit the transform and apply it to the store (or pass the store through when disabled)."""
    plan = plan_transform(cfg, emb)
    if not cfg.transform.enabled:
        if (done := reuse(plan, TransformOutput)) is not None:
            return done
        return finish(plan, TransformOutput, emb.artifact, TransformMetrics(enabled=False, seconds=0.0),
                      {"enabled": False}, [emb.key])
    return once(plan, TransformOutput, lambda: _transform(cfg, emb, plan), cfg.lock_timeout)


def _transform(cfg: PipelineConfig, emb: StageOutput, plan: StagePlan) -> TransformOutput:
    """The stage's work, under its lock."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    fit_url = store.join(plan.dir, FIT_FILE)
    saved = load_saved_fit(fit_url)
    if saved is not None:
        tf, fit_metrics = saved, TransformMetrics.model_validate(saved.info["metrics"])
        log.info("transform: resuming with the fit saved by an interrupted run (%s)", fit_url)
    else:
        tf, fit_metrics = _fit(cfg, emb, plan, device, fit_url)
    out_url = store.join(plan.dir, STORE)
    apply_transform_to_store(emb.artifact, out_url, tf, cfg.transform.chunk_rows, device)
    metrics_ = fit_metrics.model_copy(update={"seconds": round(time.perf_counter() - t0, 2)})
    return finish(plan, TransformOutput, out_url, metrics_, {"transform": cfg.transform.model_dump()}, [emb.key])


def _soft_targets(
    cfg: PipelineConfig, data: HumanData, tr: np.ndarray, va: np.ndarray, plan: StagePlan, device: torch.device
) -> tuple[np.ndarray | None, np.ndarray | None, str, ViceSummary | None]:
    """Soft targets of the training and held-out triplets, where they come from, and VICE's
    held-out accuracy and dims when VICE made them (fitted on the training triplets only)."""
    if cfg.transform.targets == "hard":
        return None, None, "none (hard targets)", None
    if data.probs is not None and cfg.transform.soft_targets == "auto":
        source = "proxy response model" if data.is_proxy else "human.probabilities"
        return data.probs[tr], data.probs[va], source, None
    model = vice.fit_vice(data.triplets[tr], data.n_objects, cfg.vice, cfg.seed, device, val=data.triplets[va])
    model.save(store.join(plan.dir, "vice.safetensors"))
    p_tr = model.predict_probabilities(data.triplets[tr], seed=cfg.seed)
    p_va = model.predict_probabilities(data.triplets[va], seed=cfg.seed)
    acc = metrics.triplet_accuracy(p_va)  # the observed pair (column 0) is the most probable one
    return p_tr, p_va, "VICE posterior predictive", ViceSummary(val_acc=acc, dims=model.dim)


def _search(
    cfg: PipelineConfig, objects: np.ndarray, train: np.ndarray, probs: np.ndarray | None, device: torch.device
) -> tuple[TransformConfig, SearchSummary | None]:
    """The transform config to fit: the configured one, or the best (alpha, lam, lr) of a
    cross-validated search over objects on the training triplets (every setting reported)."""
    t = cfg.transform
    if not (t.search_alphas or t.search_lams or t.search_lrs):
        return t, None
    grid = grid_search_transform(
        objects, train, t, t.search_alphas or [t.alpha], t.search_lams or [t.lam], t.search_lrs or [t.lr],
        t.search_folds, cfg.seed, device, probs=probs, min_knn_overlap=t.search_min_knn_overlap,
    )
    best = grid["best"]
    chosen = t.model_copy(update={k: best[k] for k in ("alpha", "lam", "lr")})
    settings = [SearchSetting(**{k: r[k] for k in SearchSetting.model_fields}) for r in grid["settings"]]
    return chosen, SearchSummary(n_folds=t.search_folds, settings=settings, best=best)


def _fit(
    cfg: PipelineConfig, emb: StageOutput, plan: StagePlan, device: torch.device, fit_url: str
) -> tuple[AffineTransform, TransformMetrics]:
    """Fit (and save) the transform on the human triplets; return it and the stage's metrics."""
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    g = embedding_store.open_embeddings(emb.artifact)
    valid = g["valid"][:]
    emb_all = np.asarray(g["embeddings"][:], dtype=np.float32)  # fit-time only; pool subsampled below
    embedding_store.check_finite_rows(emb_all, valid, emb.artifact, np.asarray(g["ids"][:]))
    objects = human.object_embeddings(emb_all, np.where(valid, data.object_of_image, -1), data.n_objects)
    tr, va = human.split_triplets(len(data.triplets), cfg.transform.val_fraction, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool_rows = np.flatnonzero(valid)
    if len(pool_rows) > POOL_ROWS:
        pool_rows = np.sort(rng.choice(pool_rows, POOL_ROWS, replace=False))
    pool = emb_all[pool_rows]
    store.makedirs(plan.dir)
    train_p, val_p, soft_source, vice_summary = _soft_targets(cfg, data, tr, va, plan, device)
    tcfg, search = _search(cfg, objects, data.triplets[tr], train_p, device)
    fit = fit_transform(objects, data.triplets[tr], data.triplets[va], tcfg, cfg.seed, device,
                        train_probs=train_p, val_probs=val_p, pool=pool)
    knn_rows = pool if len(pool) <= KNN_ROWS else pool[np.sort(rng.choice(len(pool), KNN_ROWS, replace=False))]
    standardized = (knn_rows - knn_rows.mean()) / knn_rows.std()
    fit_metrics = TransformMetrics(
        enabled=True,
        seconds=0.0,  # set when the stage finishes
        human_data=data.name(cfg),
        n_triplets=int(len(data.triplets)),
        n_train=int(len(tr)),
        n_heldout=int(len(va)),
        acc_before=fit.val_acc_before,
        acc_after=fit.val_acc_after,
        train_acc_after=fit.train_acc_after,
        best_epoch=fit.best_epoch,
        knn_k=KNN_K,
        knn_overlap=metrics.knn_overlap(standardized, fit.transform.apply(knn_rows), KNN_K),
        soft_targets=soft_source,
        hyperparameters=FitSettings(**{k: getattr(tcfg, k) for k in FitSettings.model_fields}),
        history=fit.history,
        vice=vice_summary,
        search=search,
    )
    formats.write_things_triplets(store.join(plan.dir, "human_triplets.txt"), data.triplets)
    if data.probs is not None:
        formats.write_probabilities(store.join(plan.dir, "human_probabilities.npy"), data.probs)
    fit.transform.save(fit_url, {"config": tcfg.model_dump(), "history": fit.history, "best_epoch": fit.best_epoch,
                                 "metrics": fit_metrics.model_dump(mode="json")})
    return fit.transform, fit_metrics

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
from typing import TYPE_CHECKING, Any

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.config.transform import TransformConfig
from alignet_core.context import RunContext
from alignet_core.errors import ConfigError
from alignet_core.hardware import device_type, resolve_device
from alignet_core.human import triplets as human
from alignet_core.human.data import HumanData, no_human_data_message
from alignet_core.human.mapping import MappingSummary
from alignet_core.io import embedding_store, formats, store
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage, reuse
from alignet_core.stats import metrics
from alignet_core.transform.heldout import (
    HeldOut,
    TripletSplitFigures,
    UncertaintyFigures,
    heldout_figures,
    triplet_split_figures,
    uncertainty_figures,
)

if TYPE_CHECKING:
    import torch

    from alignet_core.transform.affine import AffineTransform

# The modules that compute (torch) are imported inside the functions that use them: planning and
# reusing a finished stage (a cached rerun) must not pay for loading them.

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
    """VICE's accuracy on held-out triplets of the training objects (VICE embeds each object, so it
    cannot predict for objects it never saw) and its kept dimensions, when VICE made the soft targets."""

    val_acc: float
    dims: int
    val_split: str = "held-out triplets of the training objects"


class SearchSetting(Record):
    alpha: float
    lam: float
    lr: float
    transformed_mean: float
    zero_shot_mean: float
    knn_overlap_mean: float


class SearchSummary(Record):
    """Every setting a cross-validated search over the training objects tried, and the one chosen.
    Its accuracies are selection scores (inner folds of the training objects), not held-out figures."""

    n_folds: int
    settings: list[SearchSetting]
    best: dict[str, float]


class RoleCounts(Record):
    """How the human triplets were split by objects (`human.folds`)."""

    folds: int
    test_fold: int
    train: int
    val: int
    test: int
    dropped: int  # triplets whose objects span two roles


class TransformMetrics(StageMetrics):
    """Held-out odd-one-out accuracy before/after the transform (object-disjoint, with intervals)
    and how the fit was made; only `enabled` and `seconds` when the transform is off.

    `acc_before` / `acc_after` are the headline: the test fold's zero-shot (reference protocol) and
    transformed accuracies (`heldout` has them with intervals, per level and beside the other
    protocol)."""

    enabled: bool
    human_data: str | None = None
    n_triplets: int | None = None
    roles: RoleCounts | None = None
    acc_before: float | None = None
    acc_after: float | None = None
    heldout: HeldOut | None = None
    triplet_split: TripletSplitFigures | None = None
    uncertainty: UncertaintyFigures | None = None
    train_acc_after: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    knn_k: int | None = None
    knn_overlap: float | None = None
    soft_targets: str | None = None
    hyperparameters: FitSettings | None = None
    history: list[dict[str, float]] = []
    vice: ViceSummary | None = None
    search: SearchSummary | None = None
    objects: MappingSummary | None = None  # how a triplet file's objects attach to images (None: proxy)


class TransformOutput(StageOutput):
    metrics: TransformMetrics


def plan_transform(cfg: PipelineConfig, emb: StageOutput) -> StagePlan:
    conf: dict[str, Any] = {"transform": cfg.transform.key_dump(), "human": cfg.human.key_dump(), "seed": cfg.seed,
                            "device": device_type(cfg.device)}
    if cfg.human.triplets:
        conf["human_sha256"] = store.file_sha256(cfg.human.triplets)
    for field in ("probabilities", "objects", "concepts"):  # the files that change the data, by content
        if getattr(cfg.human, field):
            conf[f"{field}_sha256"] = store.file_sha256(getattr(cfg.human, field))
    if cfg.transform.targets == "soft":
        conf["vice"] = cfg.vice.key_dump()
    return plan_stage(cfg.root, "transform", conf, [emb.key], __name__)


def run_transform(ctx: RunContext, emb: StageOutput) -> TransformOutput:
    """Fit the transform and apply it to the store (or pass the store through when disabled)."""
    cfg = ctx.cfg
    plan = ctx.plan(plan_transform, emb)
    if not cfg.transform.enabled:
        if (done := reuse(plan, TransformOutput)) is not None:
            return done
        return finish(plan, TransformOutput, emb.artifact, TransformMetrics(enabled=False, seconds=0.0),
                      {"enabled": False}, [emb.key])
    return once(plan, TransformOutput, lambda: _transform(ctx, emb, plan), cfg.lock_timeout)


def _transform(ctx: RunContext, emb: StageOutput, plan: StagePlan) -> TransformOutput:
    """The stage's work, under its lock."""
    from alignet_core.transform.affine import apply_transform_to_store, load_saved_fit

    cfg = ctx.cfg
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    fit_url = store.join(plan.dir, FIT_FILE)
    saved = load_saved_fit(fit_url)
    if saved is not None:
        tf, fit_metrics = saved, TransformMetrics.model_validate(saved.info["metrics"])
        log.info("transform: resuming with the fit saved by an interrupted run (%s)", fit_url)
    else:
        tf, fit_metrics = _fit(ctx, emb, plan, device, fit_url)
    out_url = store.join(plan.dir, STORE)
    apply_transform_to_store(emb.artifact, out_url, tf, cfg.transform.chunk_rows, device)
    metrics_ = fit_metrics.model_copy(update={"seconds": round(time.perf_counter() - t0, 2)})
    return finish(plan, TransformOutput, out_url, metrics_, {"transform": cfg.transform.model_dump()}, [emb.key])


def _soft_targets(
    cfg: PipelineConfig, data: HumanData, fit_rows: np.ndarray, held_rows: np.ndarray, plan: StagePlan,
    device: torch.device,
) -> tuple[np.ndarray | None, np.ndarray | None, str, ViceSummary | None]:
    """Soft targets of the fitting and validation triplets and where they come from. VICE is fitted
    on the fitting triplets (checked on `held_rows`, held-out triplets of the same objects) and
    predicts targets for those only: it has no embedding for objects it never saw, so the
    validation fold is then scored on its observed choices."""
    from alignet_core.human import vice
    val = data.split.val
    if cfg.transform.targets == "hard":
        return None, None, "none (hard targets)", None
    if data.probs is not None and cfg.transform.soft_targets == "auto":
        source = "proxy response model" if data.is_proxy else "human.probabilities"
        return data.probs[fit_rows], data.probs[val], source, None
    model = vice.fit_vice(data.triplets[fit_rows], data.n_objects, cfg.vice, cfg.seed, device,
                          val=data.triplets[held_rows])
    model.save(store.join(plan.dir, "vice.safetensors"))
    p_fit = model.predict_probabilities(data.triplets[fit_rows], seed=cfg.seed)
    acc = metrics.triplet_accuracy(model.predict_probabilities(data.triplets[held_rows], seed=cfg.seed))
    return p_fit, None, "VICE posterior predictive", ViceSummary(val_acc=acc, dims=model.dim)


def _search(
    cfg: PipelineConfig, objects: np.ndarray, train: np.ndarray, probs: np.ndarray | None, device: torch.device
) -> tuple[TransformConfig, SearchSummary | None]:
    """The transform config to fit: the configured one, or the best (alpha, lam, lr) of a
    cross-validated search over objects on the training triplets (every setting reported)."""
    from alignet_core.transform.search import grid_search_transform

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
    ctx: RunContext, emb: StageOutput, plan: StagePlan, device: torch.device, fit_url: str
) -> tuple[AffineTransform, TransformMetrics]:
    """Fit (and save) the transform on the training objects' triplets, stop early on the validation
    fold, score it on the test fold; return it and the stage's metrics."""
    from alignet_core.transform.fit import fit_transform

    cfg, data = ctx.cfg, ctx.human
    if data is None:
        raise ConfigError(no_human_data_message(ctx.source))
    g = embedding_store.open_embeddings(emb.artifact)
    valid = np.asarray(g["valid"][:], dtype=bool)
    embedding_store.check_store_finite(g, emb.artifact, valid)  # block by block, before any work
    # only the rows the fit uses are read (float32): the objects' images and the local term's pool
    object_of = np.where(valid, data.object_of_image, -1)
    object_rows = np.flatnonzero(object_of >= 0)
    objects = human.object_embeddings(embedding_store.gather_rows(g["embeddings"], object_rows),
                                      object_of[object_rows], data.n_objects)
    sp = data.split
    fit_i, held_i = human.split_triplets(len(sp.train), cfg.transform.val_fraction, cfg.seed)
    fit_rows, held_rows = sp.train[fit_i], sp.train[held_i]
    rng = np.random.default_rng(cfg.seed)
    pool_rows = np.flatnonzero(valid & ~np.isin(data.object_of_image, _held_out(cfg, data)))
    if len(pool_rows) > POOL_ROWS:
        pool_rows = np.sort(rng.choice(pool_rows, POOL_ROWS, replace=False))
    pool = embedding_store.gather_rows(g["embeddings"], pool_rows)  # the local term's rows: no image of a
    # validation or test object
    store.makedirs(plan.dir)
    fit_p, val_p, soft_source, vice_summary = _soft_targets(cfg, data, fit_rows, held_rows, plan, device)
    tcfg, search = _search(cfg, objects, data.triplets[fit_rows], fit_p, device)
    fit = fit_transform(objects, data.triplets[fit_rows], data.triplets[sp.val], tcfg, cfg.seed, device,
                        train_probs=fit_p, val_probs=val_p, pool=pool)
    knn_rows = pool if len(pool) <= KNN_ROWS else pool[np.sort(rng.choice(len(pool), KNN_ROWS, replace=False))]
    standardized = (knn_rows - knn_rows.mean()) / knn_rows.std()
    test = data.triplets[sp.test]
    held = heldout_figures(objects, fit.transform, test, cfg.seed,
                           None if data.level_of is None else data.level_of[sp.test])
    unc = None
    if data.probs is not None:
        unc = uncertainty_figures(objects, fit.transform, test, data.probs[sp.test], data.triplets[fit_rows],
                                  tcfg.temperature)
    fit_metrics = TransformMetrics(
        enabled=True,
        seconds=0.0,  # set when the stage finishes
        human_data=data.name(cfg),
        n_triplets=int(len(data.triplets)),
        roles=RoleCounts(folds=cfg.human.folds, test_fold=cfg.human.test_fold, train=len(sp.train),
                         val=len(sp.val), test=len(sp.test), dropped=sp.n_mixed),
        acc_before=held.zero_shot.value,
        acc_after=held.transformed.value,
        heldout=held,
        triplet_split=triplet_split_figures(objects, fit.transform, data.triplets[held_rows], cfg.seed),
        uncertainty=unc,
        train_acc_after=fit.train_acc_after,
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.history),
        knn_k=KNN_K,
        knn_overlap=metrics.knn_overlap(standardized, fit.transform.apply(knn_rows), KNN_K),
        soft_targets=soft_source,
        hyperparameters=FitSettings(**{k: getattr(tcfg, k) for k in FitSettings.model_fields}),
        history=fit.history,
        vice=vice_summary,
        search=search,
        objects=data.mapping,
    )
    log.info("transform: test fold (%d objects, %d triplets): zero-shot %s → transformed %s (%s)",
             held.n_objects, held.transformed.n, held.zero_shot.text(), held.transformed.text(), held.gain.text())
    formats.write_things_triplets(store.join(plan.dir, "human_triplets.txt"), data.triplets)
    if data.probs is not None:
        formats.write_probabilities(store.join(plan.dir, "human_probabilities.npy"), data.probs)
    fit.transform.save(fit_url, {"config": tcfg.model_dump(), "history": fit.history, "best_epoch": fit.best_epoch,
                                 "metrics": fit_metrics.model_dump(mode="json")})
    return fit.transform, fit_metrics


def _held_out(cfg: PipelineConfig, data: HumanData) -> np.ndarray:
    """Object ids of the validation and test folds: no image of theirs enters the fit."""
    return np.flatnonzero(np.isin(data.fold_of, [cfg.human.val_fold, cfg.human.test_fold]))

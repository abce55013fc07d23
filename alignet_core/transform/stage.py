"""Stage 1, transform: fit the human-aligned affine transform of the teacher on odd-one-out triplets
(gLocal; soft "uncertainty distillation" targets) and apply it to the store chunk by chunk.

The fit rotates over the `human.folds` folds of objects (`rotation.py`): fold f's transform trains
on the triplets with no object in f (early stopping and any search on a triplet split of those) and
is scored on the triplets with all three objects in f; the held-out figures pool the folds (every
object tested once). Then the transform is refit on every triplet with the settings and the epoch
count the folds chose. The store holds the designated test fold's transform (`human.test_fold`)
when `human.teacher` is "heldout", the refit when it is "all" (`TransformMetrics.teacher`).

In: the embed stage's store and the human triplets (`human`; the demo's taxonomy proxy without
them). Out: `<dir>/transformed.zarr` (raw float32, read whole by clustering and every sampling
shard), `transform.safetensors` (the store's transform, with the stage's metrics), every fold's fit
(`fold_<f>.safetensors`) and the refit (`refit_all.safetensors`), the triplets used and, when VICE
made the soft targets, `vice_fold_<f>.safetensors` / `vice_all.safetensors`. With
`transform.enabled` false the output is the untransformed store. A run killed after the store's
transform was saved resumes with it (it is not refitted), so every chunk of the transformed store
comes from one transform.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.errors import ConfigError
from alignet_core.hardware import device_type, resolve_device
from alignet_core.human import triplets as human
from alignet_core.human.data import DENSE_TEST_FILE, DENSE_TEST_PROBS, human_files, no_human_data_message, trial_file
from alignet_core.human.mapping import MappingSummary
from alignet_core.io import embedding_store, formats, sources, store
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage, reuse
from alignet_core.transform.dense import SOFT_DENSE, DenseSets, DenseSummary, run_dense
from alignet_core.transform.heldout import (
    ExpectedFigures,
    FoldFigures,
    HeldOut,
    PartialFigures,
    RealFigures,
    TripletSplitFigures,
    UncertaintyFigures,
    choice_distributions,
    expected_figures,
    expected_outcomes,
    outcomes,
    partial_figures,
    pooled_figures,
    real_figures,
    triplet_split_from,
    uncertainty_pooled,
)

if TYPE_CHECKING:
    import torch

    from alignet_core.transform.affine import AffineTransform
    from alignet_core.transform.rotation import FoldFit

# The modules that compute (torch) are imported inside the functions that use them: planning and
# reusing a finished stage (a cached rerun) must not pay for loading them.

log = logging.getLogger(__name__)

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
    """VICE's accuracy on the early-stopping triplets of the training objects (VICE embeds each object,
    so it cannot predict for objects it never saw) and its kept dimensions, for the store's transform,
    when VICE made the soft targets (each fold's VICE accuracy is in `folds`)."""

    val_acc: float
    dims: int
    val_split: str = "held-out triplets of the training objects"


class SearchSetting(Record):
    alpha: float
    lam: float
    lr: float
    transformed_mean: float
    zero_shot_dot_mean: float  # dot products of the standardized embeddings (where the fit starts), not cosine
    knn_overlap_mean: float


class SearchSummary(Record):
    """Every setting a cross-validated search over the training objects tried, and the one chosen.
    Its accuracies are selection scores (inner folds of the training objects), not held-out figures."""

    n_folds: int
    settings: list[SearchSetting]
    best: dict[str, float]


class RotationCounts(Record):
    """How the k-fold rotation used the human triplets (`human.folds`)."""

    folds: int
    test_fold: int  # the designated fold: its transform is the store's with teacher "heldout"
    n_triplets: int
    test: int  # test triplets over all folds (all three objects in one fold), each scored once
    partial: int  # rows with objects in two or three folds: they train the folds they avoid, test none
    train_share: float  # mean over the folds of (fitting rows) / n_triplets
    trained_on: int  # rows that train at least one fold's fit
    stop_per_fold: int  # early-stopping rows per fold (a triplet split of the fold's training rows)


class RefitSummary(Record):
    """The transform refit on every triplet with the folds' settings and epoch count (no early
    stopping); its accuracies are in-sample (every triplet was fitted)."""

    n_triplets: int
    epochs: int
    epochs_rule: str = "median over the folds of the epochs kept (best epoch + 1), rounded up; same passes over more rows"
    train_acc: float
    monitor_acc: float  # on the monitored rows (in-sample)
    soft_targets: str
    hyperparameters: FitSettings


TEACHER_LABELS = {"heldout": "fold {f}'s transform (never saw a triplet naming a fold-{f} object)",
                  "all": "the refit on all {n} triplets ({e} epochs): the test fold's figures are not held-out for it"}


class TransformMetrics(StageMetrics):
    """Held-out odd-one-out accuracy before/after the transform (object-disjoint, pooled over the k
    folds of the rotation, with intervals) and how the fits were made; only `enabled` and `seconds`
    when the transform is off.

    `acc_before` / `acc_after` are the headline: the pooled test triplets' zero-shot (reference
    protocol) and transformed accuracies (`heldout` has them with intervals, per level and beside the
    other protocol; `folds` per fold). `teacher` says which transform the store holds; `best_epoch`,
    `epochs_run`, `history`, `hyperparameters`, `train_acc_after`, `knn_overlap`, `vice` and `search`
    describe that transform's fit; `soft_targets` is the provenance of the folds' soft targets."""

    enabled: bool
    human_data: str | None = None
    n_triplets: int | None = None
    rotation: RotationCounts | None = None
    acc_before: float | None = None
    acc_after: float | None = None
    heldout: HeldOut | None = None
    folds: list[FoldFigures] = []
    partial: PartialFigures | None = None
    triplet_split: TripletSplitFigures | None = None
    uncertainty: UncertaintyFigures | None = None
    expected: ExpectedFigures | None = None  # human.densify: expected accuracy against VICE on every trial
    real: RealFigures | None = None  # human.densify: the real trials inside the held-out folds
    dense: DenseSummary | None = None
    teacher: str | None = None  # "heldout" or "all": the transform the store holds
    teacher_fit: str | None = None  # that transform, in words
    refit: RefitSummary | None = None
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
    for field, url in human_files(cfg.human).items():  # the files that change the data, by content
        conf["human_sha256" if field == "triplets" else f"{field}_sha256"] = store.file_sha256(url)
    if cfg.transform.targets == "soft":
        conf["vice"] = cfg.vice.key_dump()
    if trial_file(cfg.human) is None:  # the taxonomy proxy: triplets drawn from the source's labels
        conf |= sources.labels_entry(cfg.source)
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


def _search_summary(ff: FoldFit) -> SearchSummary | None:
    if ff.search is None:
        return None
    settings = [SearchSetting(**{k: r[k] for k in SearchSetting.model_fields}) for r in ff.search["settings"]]
    return SearchSummary(n_folds=ff.settings.search_folds, settings=settings, best=ff.search["best"])


def _settings(ff: FoldFit) -> FitSettings:
    return FitSettings(**{k: getattr(ff.settings, k) for k in FitSettings.model_fields})


def _save_fit(folder: str, ff: FoldFit, extra: dict[str, Any] | None = None) -> None:
    """Save a fold's fit (`fold_<f>.safetensors`, or `refit_all.safetensors`) and its VICE beside it."""
    name = "all" if ff.fold is None else f"fold_{ff.fold}"
    ff.transform.save(store.join(folder, "refit_all.safetensors" if ff.fold is None else f"{name}.safetensors"), {"config": ff.settings.model_dump(), "history": ff.result.history,
                            "best_epoch": ff.result.best_epoch, "fold": ff.fold, "soft_targets": ff.soft_targets,
                            **(extra or {})})
    if ff.vice is not None:
        ff.vice.save(store.join(folder, f"vice_{name}.safetensors"), {"fold": ff.fold,
                                                                       "objects": ff.train_objects.tolist()})


def _problem(ctx: RunContext, emb: StageOutput, dense: DenseSets | None = None) -> tuple[Any, np.ndarray]:
    """The rotation's `Problem` (every object's mean embedding, the triplets, the local term's candidate
    images) read from the store, and the store rows of the candidates. With `dense` (`human.densify`) the
    triplets are its blocks: each fit trains on its own, the test block tests."""
    from alignet_core.transform.rotation import POOL_ROWS, SOFT_GIVEN, SOFT_PROXY, Problem

    cfg, data = ctx.cfg, ctx.human
    assert data is not None
    g = embedding_store.open_embeddings(emb.artifact)
    valid = np.asarray(g["valid"][:], dtype=bool)
    embedding_store.check_store_finite(g, emb.artifact, valid)  # block by block, before any work
    # only the rows the fits use are read (float32): the objects' images and the local term's candidates
    object_of = np.where(valid, data.object_of_image, -1)
    object_rows = np.flatnonzero(object_of >= 0)
    objects = human.object_embeddings(embedding_store.gather_rows(g["embeddings"], object_rows),
                                      object_of[object_rows], data.n_objects)
    k = cfg.human.folds
    cand = np.flatnonzero(valid)
    n_cand = int(np.ceil(POOL_ROWS * k / (k - 1)))  # enough that each fold keeps POOL_ROWS after its own are left out
    if len(cand) > n_cand:
        cand = np.sort(np.random.default_rng([cfg.seed, 37]).choice(cand, n_cand, replace=False))
    pool = embedding_store.gather_rows(g["embeddings"], cand)
    if dense is not None:
        return Problem(objects=objects, triplets=dense.triplets, probs=dense.probs, probs_source=SOFT_DENSE,
                       fold_of=data.fold_of, pool=pool, pool_object=object_of[cand],
                       train_rows_of=dense.train_rows_of, test_pool=dense.test_rows), cand
    source = None if data.probs is None else (SOFT_PROXY if data.is_proxy else SOFT_GIVEN)
    return Problem(objects=objects, triplets=data.triplets, probs=data.probs, probs_source=source,
                   fold_of=data.fold_of, pool=pool, pool_object=object_of[cand]), cand


def _fit(
    ctx: RunContext, emb: StageOutput, plan: StagePlan, device: torch.device, fit_url: str
) -> tuple[AffineTransform, TransformMetrics]:
    """Fit one transform per fold of objects (scored on the fold's triplets), pool the held-out
    figures, refit on every triplet, save all the fits and return the store's transform (the test
    fold's or the refit, `human.teacher`) with the stage's metrics."""
    from alignet_core.transform.rotation import KNN_K, fit_fold, refit_epochs

    cfg, data = ctx.cfg, ctx.human
    if data is None:
        raise ConfigError(no_human_data_message(ctx.source))
    store.makedirs(plan.dir)
    dense, dense_summary = run_dense(cfg, data, device) if data.dense else (None, None)
    problem, _ = _problem(ctx, emb, dense)
    t, objects, k = problem.triplets, problem.objects, cfg.human.folds
    probs = problem.probs
    exp_out: dict[str, list[np.ndarray]] = {"zero_shot": [], "transformed": []}
    real_out: dict[str, list[np.ndarray]] = {"zero_shot": [], "transformed": []}
    real_rows: list[np.ndarray] = []
    fits: list[FoldFit] = []
    test_out: dict[str, list[np.ndarray]] = {"zero_shot": [], "zero_shot_dot": [], "transformed": []}
    part_out: dict[str, list[np.ndarray]] = {"zero_shot": [], "transformed": []}
    stop_out: dict[str, list[np.ndarray]] = {"zero_shot": [], "transformed": []}
    test_rows, n_held, q_after, q_zero, t_zeros = [], [], [], [], []
    rng = np.random.default_rng([cfg.seed, 47])
    fold_figures = []
    for f in range(k):
        ff = fit_fold(problem, f, cfg.transform, cfg.vice, cfg.seed, device)
        fits.append(ff)
        _save_fit(plan.dir, ff)
        o = outcomes(objects, ff.transform, t[ff.test_rows])
        for key in test_out:
            test_out[key].append(o[key])
        test_rows.append(ff.test_rows)
        po = outcomes(objects, ff.transform, t[ff.partial_rows])
        so = outcomes(objects, ff.transform, t[ff.stop_rows])
        for key in part_out:
            part_out[key].append(po[key])
            stop_out[key].append(so[key])
        n_held.append((data.fold_of[t[ff.partial_rows]] == f).sum(1))
        if dense is not None:
            eo = expected_outcomes(objects, ff.transform, t[ff.test_rows], probs[ff.test_rows])
            real_test = human.split_by_objects(data.triplets, data.fold_of, f).test
            ro = outcomes(objects, ff.transform, data.triplets[real_test])
            for key in exp_out:
                exp_out[key].append(eo[key])
                real_out[key].append(ro[key])
            real_rows.append(real_test)
        if probs is not None:
            temp_rows = ff.fit_rows if len(ff.fit_rows) <= 100_000 else rng.choice(ff.fit_rows, 100_000, replace=False)
            qa, qz, tz = choice_distributions(objects, ff.transform, t[ff.test_rows], t[temp_rows],
                                              ff.settings.temperature)
            q_after.append(qa)
            q_zero.append(qz)
            t_zeros.append(tz)
        r = ff.result
        fold_figures.append(FoldFigures(
            fold=f, held_out_objects=int((data.fold_of == f).sum()), train_objects=len(ff.train_objects),
            fit_triplets=len(ff.fit_rows), stop_triplets=len(ff.stop_rows), test_triplets=len(ff.test_rows),
            partial_triplets=len(ff.partial_rows), zero_shot=float(np.mean(o["zero_shot"])) if len(o["zero_shot"]) else float("nan"),
            transformed=float(np.mean(o["transformed"])) if len(o["transformed"]) else float("nan"),
            best_epoch=r.best_epoch, epochs_run=len(r.history), knn_overlap=ff.knn_overlap, vice_acc=ff.vice_acc))
    epochs = refit_epochs([ff.result.best_epoch for ff in fits])
    refit = fit_fold(problem, None, cfg.transform, cfg.vice, cfg.seed, device, epochs=epochs)
    _save_fit(plan.dir, refit, {"epochs_from_folds": [ff.result.best_epoch for ff in fits]})

    all_test = np.concatenate(test_rows)
    cat = {key: np.concatenate(v) for key, v in test_out.items()}
    held = pooled_figures(cat, t[all_test], cfg.seed, None if data.level_of is None else data.level_of[all_test],
                          n_folds=k)
    unc = None
    if probs is not None:
        unc = uncertainty_pooled(probs[all_test], np.concatenate(q_after), np.concatenate(q_zero),
                                 cfg.transform.temperature, float(np.mean(t_zeros)))
    expected = real = None
    if dense is not None:
        expected = expected_figures({key: np.concatenate(v) for key, v in exp_out.items()}, t[all_test],
                                    probs[all_test], cfg.seed)
        real = real_figures({key: np.concatenate(v) for key, v in real_out.items()},
                            data.triplets[np.concatenate(real_rows)], cfg.seed)
    chosen = fits[cfg.human.test_fold] if cfg.human.teacher == "heldout" else refit
    fit_rows_any = np.zeros(len(t), dtype=bool)
    for ff in fits:
        fit_rows_any[ff.fit_rows] = True
    rr = refit.result
    folds_of_rows = data.fold_of[t]
    fit_metrics = TransformMetrics(
        enabled=True,
        seconds=0.0,  # set when the stage finishes
        human_data=data.name(cfg),
        n_triplets=len(t),
        rotation=RotationCounts(
            folds=k, test_fold=cfg.human.test_fold, n_triplets=len(t), test=len(all_test),
            partial=0 if dense is not None else int((folds_of_rows != folds_of_rows[:, :1]).any(1).sum()),
            train_share=float(np.mean([len(ff.fit_rows) for ff in fits]) / len(t)),
            trained_on=int(fit_rows_any.sum()), stop_per_fold=int(np.median([len(ff.stop_rows) for ff in fits]))),
        acc_before=held.zero_shot.value,
        acc_after=held.transformed.value,
        heldout=held,
        folds=fold_figures,
        partial=partial_figures({key: np.concatenate(v) for key, v in part_out.items()}, np.concatenate(n_held),
                                cfg.seed) if sum(len(ff.partial_rows) for ff in fits) else None,
        triplet_split=triplet_split_from({key: np.concatenate(v) for key, v in stop_out.items()}, cfg.seed),
        uncertainty=unc,
        expected=expected,
        real=real,
        dense=dense_summary,
        teacher=cfg.human.teacher,
        teacher_fit=TEACHER_LABELS[cfg.human.teacher].format(f=cfg.human.test_fold, n=len(t), e=epochs),
        refit=RefitSummary(n_triplets=len(refit.fit_rows), epochs=epochs, train_acc=rr.train_acc_after,
                           monitor_acc=rr.val_acc_after, soft_targets=refit.soft_targets,
                           hyperparameters=_settings(refit)),
        train_acc_after=chosen.result.train_acc_after,
        best_epoch=chosen.result.best_epoch,
        epochs_run=len(chosen.result.history),
        knn_k=KNN_K,
        knn_overlap=chosen.knn_overlap,
        soft_targets=fits[0].soft_targets,
        hyperparameters=_settings(chosen),
        history=chosen.result.history,
        vice=None if chosen.vice is None else ViceSummary(
            val_acc=float(chosen.vice_acc), dims=chosen.vice.dim,
            val_split=ViceSummary.model_fields["val_split"].default if chosen.fold is not None
            else "monitored triplets (in-sample: the refit's VICE saw every triplet)"),
        search=_search_summary(chosen),
        objects=data.mapping,
    )
    log.info("transform: %d folds pooled (%d objects, %d test triplets): zero-shot %s → transformed %s (%s); "
             "the store holds %s", k, held.n_objects, held.transformed.n, held.zero_shot.text(),
             held.transformed.text(), held.gain.text(), fit_metrics.teacher_fit)
    formats.write_things_triplets(store.join(plan.dir, "human_triplets.txt"), t)
    if probs is not None:
        formats.write_probabilities(store.join(plan.dir, "human_probabilities.npy"), probs)
    if dense is not None:  # the test block, for the evaluate stage's models (object ids, VICE-on-every-trial labels)
        formats.write_things_triplets(store.join(plan.dir, DENSE_TEST_FILE), t[dense.test_rows])
        formats.write_probabilities(store.join(plan.dir, DENSE_TEST_PROBS), probs[dense.test_rows])
    chosen.transform.save(fit_url, {"config": chosen.settings.model_dump(), "history": chosen.result.history,
                                    "best_epoch": chosen.result.best_epoch, "teacher": cfg.human.teacher,
                                    "metrics": fit_metrics.model_dump(mode="json")})
    return chosen.transform, fit_metrics

"""The pipeline's stages as plain functions: each plans its content key and output directory,
skips work whose manifest is complete, and otherwise runs the science in the other modules.

Prefect tasks wrap these one to one (see `tasks/`); everything here runs without Prefect.

Every stage writes under `<root>/stages/<stage>/<key>/`, where the key hashes the stage's config
section, the keys of its inputs and the source of the code that computes it. The manifest is
written last, so a directory without one is never trusted and the stage reruns (resuming from
whatever chunks or shards it had finished).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from alignet_core import models
from alignet_core.cluster import kmeans as cluster
from alignet_core.cluster import kmeans_torch
from alignet_core.distill import train as distill
from alignet_core.embed import extract as embed
from alignet_core.evaluate import metrics as evaluate
from alignet_core.io import embedding_store, formats, lock, sources, store
from alignet_core.sample import shards as dataset
from alignet_core.sample import strategies as sampling
from alignet_core.sample import teacher, versions
from alignet_core.transform import affine as transform
from alignet_core.transform import human, vice
from alignet_core.transform import search as transform_search
from alignet_core.config import PipelineConfig
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.hardware import resolve_device, resolve_devices

log = logging.getLogger(__name__)

TRANSFORMED_FOLDER = "uncertainty_distillation"
_KNN_K = 10  # neighbours in the transform's local-structure score
_KNN_ROWS = 5000  # pool rows it is computed on
UNTRANSFORMED_FOLDER = "untransformed"


class StagePlan(BaseModel):
    """Where a stage's outputs live and under which content key."""

    model_config = ConfigDict(frozen=True)
    stage: str
    key: str
    dir: str


class StageOutput(BaseModel):
    """What a stage hands to the next: its key, directory, main artifact and headline metrics."""

    model_config = ConfigDict(frozen=True)
    stage: str
    key: str
    dir: str
    artifact: str = Field(description="the main output: a store, a dataset folder, a checkpoint folder")
    metrics: dict[str, Any] = Field(default_factory=dict)


def _plan(cfg: PipelineConfig, stage: str, config: Any, inputs: list[str], *modules: Any) -> StagePlan:
    key = store.content_key(stage, config, inputs, store.code_version(*modules))
    return StagePlan(stage=stage, key=key, dir=store.stage_dir(cfg.root, stage, key))


def _finish(plan: StagePlan, artifact: str, metrics: dict[str, Any], config: Any, inputs: list[str]) -> StageOutput:
    out = StageOutput(stage=plan.stage, key=plan.key, dir=plan.dir, artifact=artifact, metrics=metrics)
    store.write_manifest(plan.dir, {"stage": plan.stage, "key": plan.key, "config": config, "inputs": inputs,
                                    "artifact": artifact, "metrics": metrics})
    return out


def _reuse(plan: StagePlan) -> StageOutput | None:
    """The output of a complete stage directory, or None. A manifest is trusted only when it names this
    stage and key and an artifact inside the artifact root (`StoreError` otherwise): a copied or edited
    manifest can never point a run at files elsewhere."""
    if not store.is_complete(plan.dir):
        return None
    m = store.read_manifest(plan.dir)
    root = plan.dir.rstrip("/").rsplit("/", 3)[0]  # <root>/stages/<stage>/<key>
    if m.get("stage") != plan.stage or m.get("key") != plan.key or not store.is_inside(m.get("artifact"), root):
        raise StoreError(
            f"{store.join(plan.dir, store.MANIFEST)}: names stage {m.get('stage')!r}, key {m.get('key')!r} and "
            f"artifact {m.get('artifact')!r}; expected stage {plan.stage!r}, key {plan.key!r} and an artifact "
            f"inside the root {root!r}. Delete {plan.dir!r} to recompute it"
        )
    log.info("%s: reusing complete output %s", plan.stage, plan.dir)
    return StageOutput(stage=plan.stage, key=plan.key, dir=plan.dir, artifact=m["artifact"], metrics=m["metrics"])


def _once(cfg: PipelineConfig, plan: StagePlan, work: Callable[[], StageOutput], clean: bool = True) -> StageOutput:
    """A stage's output: reused when its directory is complete, else made by `work()` while this
    run holds the stage's writer lock (a run that waited for another reuses what that one made).
    Disk-full errors become a `StoreError`; with `clean`, temporaries of a killed writer go first."""
    if (done := _reuse(plan)) is not None:
        return done
    with lock.stage_lock(plan.dir, cfg.lock_timeout), store.disk_full_as_store_error(plan.dir):
        if (done := _reuse(plan)) is not None:  # another run finished it while this one waited
            return done
        if clean:
            store.remove_temporaries(plan.dir)
        return work()


# ----------------------------------------------------------------------------- embed
def _source_identity(cfg: PipelineConfig) -> dict[str, Any]:
    ident: dict[str, Any] = cfg.source.model_dump()
    if cfg.source.kind == "demo":
        ident["data"] = store.file_sha256(str(sources.demo_data_dir() / "metadata.csv"))
    return ident


def plan_embed(cfg: PipelineConfig) -> StagePlan:
    # which devices run the extraction changes no output (like `device` and sample.n_workers)
    conf = {"source": _source_identity(cfg), "embed": cfg.embed.model_dump(exclude={"devices"})}
    return _plan(cfg, "embed", conf, [], embed, models, sources, store)


def run_embed(cfg: PipelineConfig, progress: Callable[[int, int], None] | None = None) -> StageOutput:
    """Stage 0: teacher pooled pre-logits of every image → `<dir>/embeddings.zarr`."""
    plan = plan_embed(cfg)
    return _once(cfg, plan, lambda: _embed(cfg, plan, progress))


def _embed(cfg: PipelineConfig, plan: StagePlan, progress: Callable[[int, int], None] | None) -> StageOutput:
    """Stage 0's work, under its lock."""
    t0 = time.perf_counter()
    src = sources.source_from_config(cfg.source)
    url = store.join(plan.dir, "embeddings.zarr")
    info = embed.extract_embeddings(src, cfg.embed, url, resolve_device(cfg.device), progress=progress)
    metrics = {
        "n_images": info["n"],
        "n_valid": info["n_valid"],
        "dim": info["dim"],
        "skipped": info["skipped"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return _finish(plan, url, metrics, {"embed": cfg.embed.model_dump()}, [])


# ----------------------------------------------------------------------------- human triplets
class HumanData(BaseModel):
    """Odd-one-out triplets over objects, the object of each image and optional probabilities."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) int64, odd one in column 2
    probs: np.ndarray | None  # (t, 3) float over pairs [(0,1), (0,2), (1,2)]
    object_of_image: np.ndarray  # (n,) int64, -1 for images of no object
    n_objects: int
    is_proxy: bool


def load_human_data(cfg: PipelineConfig, src: sources.ImageSource) -> HumanData:
    """Read THINGS-format triplets (or make the demo's taxonomy proxy when none are given)."""
    h = cfg.human
    n = len(src)
    if h.triplets is None:
        if cfg.source.kind != "demo":
            raise ConfigError("human.triplets: a triplet file is required unless source.kind is 'demo'")
        by_id = {m["id"]: m for m in sources.demo_metadata()}
        meta = [by_id[i] for i in src.ids().tolist()]
        fine = np.unique([m[h.proxy_level] for m in meta], return_inverse=True)[1]
        coarse = np.unique([m["category"] for m in meta], return_inverse=True)[1]
        coarse_arg = None if h.proxy_level == "category" else coarse
        trip, probs = human.make_proxy_triplets(fine, coarse_arg, h.proxy_n_triplets, h.proxy_noise, cfg.seed)
        return HumanData(triplets=trip, probs=probs, object_of_image=np.arange(n), n_objects=n, is_proxy=True)
    if h.objects is None:
        object_of_image, n_objects = np.arange(n), n
    else:
        object_of_image, n_objects = _read_objects_table(h.objects, src)
    trip = formats.read_things_triplets(h.triplets, n_objects)
    probs = formats.read_probabilities(h.probabilities, len(trip)) if h.probabilities else None
    return HumanData(triplets=trip, probs=probs, object_of_image=object_of_image, n_objects=n_objects, is_proxy=False)


def _read_objects_table(url: str, src: sources.ImageSource) -> tuple[np.ndarray, int]:
    """CSV `object,image_id`: object ids 0..m-1, image ids as in the source."""
    import csv

    index = {i: r for r, i in enumerate(src.ids().tolist())}
    object_of_image = np.full(len(src), -1, dtype=np.int64)
    try:
        with fsspec.open(url, "r") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise InputError(f"human.objects: file {url!r} does not exist") from None
    for line, row in enumerate(rows, start=2):
        try:
            obj, img = int(row["object"]), row["image_id"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{url}: line {line}: expected columns 'object' (int) and 'image_id'") from None
        if img not in index:
            raise InputError(f"{url}: line {line}: image_id {img!r} is not in the image source")
        object_of_image[index[img]] = obj
    n_objects = int(object_of_image.max()) + 1 if len(rows) else 0
    return object_of_image, n_objects


# ----------------------------------------------------------------------------- transform
def plan_transform(cfg: PipelineConfig, emb: StageOutput) -> StagePlan:
    conf = {"transform": cfg.transform.model_dump(), "human": cfg.human.model_dump(), "seed": cfg.seed}
    if cfg.human.triplets:
        conf["human_sha256"] = store.file_sha256(cfg.human.triplets)
    if cfg.transform.targets == "soft":
        conf["vice"] = cfg.vice.model_dump()
    return _plan(cfg, "transform", conf, [emb.key], transform, transform_search, vice, human, formats, evaluate, store)


def run_transform(cfg: PipelineConfig, emb: StageOutput) -> StageOutput:
    """Stage 1: fit the human-aligned affine transform and apply it to the store chunk-wise.

    With `transform.enabled` false the output is the untransformed store (no fit). A run killed after
    the fit was saved resumes with that fit (it is not refitted), so the applied chunks of the killed
    run and of the rerun always come from the same transform, even where fits are not bit-reproducible."""
    plan = plan_transform(cfg, emb)
    if not cfg.transform.enabled:
        if (done := _reuse(plan)) is not None:
            return done
        return _finish(plan, emb.artifact, {"enabled": False, "seconds": 0.0}, {"enabled": False}, [emb.key])
    return _once(cfg, plan, lambda: _transform(cfg, emb, plan))


def _transform(cfg: PipelineConfig, emb: StageOutput, plan: StagePlan) -> StageOutput:
    """Stage 1's work, under its lock."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    transform_url = store.join(plan.dir, "transform.safetensors")
    saved = transform.load_saved_fit(transform_url)
    if saved is not None:
        tf, fit_metrics = saved, saved.info["metrics"]
        log.info("transform: resuming with the fit saved by an interrupted run (%s)", transform_url)
    else:
        tf, fit_metrics = _fit_teacher_transform(cfg, emb, plan, device, transform_url)
    out_url = store.join(plan.dir, "transformed.zarr")
    transform.apply_transform_to_store(emb.artifact, out_url, tf, cfg.transform.chunk_rows, device)
    metrics = {"enabled": True, **fit_metrics, "seconds": round(time.perf_counter() - t0, 2)}
    return _finish(plan, out_url, metrics, {"transform": cfg.transform.model_dump()}, [emb.key])


def _soft_targets(
    cfg: PipelineConfig, data: HumanData, tr: np.ndarray, va: np.ndarray, plan: StagePlan, device: Any
) -> tuple[np.ndarray | None, np.ndarray | None, str, dict[str, Any] | None]:
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
    acc = evaluate.triplet_accuracy(p_va)  # the observed pair (column 0) is the most probable one
    return p_tr, p_va, "VICE posterior predictive", {"val_acc": acc, "dims": model.dim}


def _search(
    cfg: PipelineConfig, objects: np.ndarray, train: np.ndarray, probs: np.ndarray | None, device: Any
) -> tuple[Any, dict[str, Any] | None]:
    """The transform config to fit: the configured one, or the best (alpha, lam, lr) of a
    cross-validated search over objects on the training triplets (every setting reported)."""
    t = cfg.transform
    if not (t.search_alphas or t.search_lams or t.search_lrs):
        return t, None
    grid = transform_search.grid_search_transform(
        objects, train, t, t.search_alphas or [t.alpha], t.search_lams or [t.lam], t.search_lrs or [t.lr],
        t.search_folds, cfg.seed, device, probs=probs, min_knn_overlap=t.search_min_knn_overlap,
    )
    keys = ("alpha", "lam", "lr", "transformed_mean", "zero_shot_mean", "knn_overlap_mean")
    best = grid["best"]
    chosen = t.model_copy(update={k: best[k] for k in ("alpha", "lam", "lr")})
    return chosen, {"n_folds": t.search_folds, "settings": [{k: r[k] for k in keys} for r in grid["settings"]],
                    "best": best}


def _fit_teacher_transform(
    cfg: PipelineConfig, emb: StageOutput, plan: StagePlan, device: Any, transform_url: str
) -> tuple[transform.AffineTransform, dict[str, Any]]:
    """Fit (and save) the transform on the human triplets; return it and the stage's metrics."""
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    g = embedding_store.open_embeddings(emb.artifact)
    valid = g["valid"][:]
    emb_all = np.asarray(g["embeddings"][:], dtype=np.float32)  # fit-time only; pool subsampled below
    embedding_store.check_finite_rows(emb_all, valid, emb.artifact, np.asarray(g["ids"][:]))
    ooi = np.where(valid, data.object_of_image, -1)
    objects = human.object_embeddings(emb_all, ooi, data.n_objects)
    tr, va = human.split_triplets(len(data.triplets), cfg.transform.val_fraction, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pool_rows = np.flatnonzero(valid)
    if len(pool_rows) > 20000:
        pool_rows = np.sort(rng.choice(pool_rows, 20000, replace=False))
    pool = emb_all[pool_rows]
    store.makedirs(plan.dir)
    train_p, val_p, soft_source, vice_info = _soft_targets(cfg, data, tr, va, plan, device)
    tcfg, search = _search(cfg, objects, data.triplets[tr], train_p, device)
    fit = transform.fit_transform(objects, data.triplets[tr], data.triplets[va], tcfg, cfg.seed, device,
                                  train_probs=train_p, val_probs=val_p, pool=pool)
    knn_rows = pool if len(pool) <= _KNN_ROWS else pool[np.sort(rng.choice(len(pool), _KNN_ROWS, replace=False))]
    standardized = (knn_rows - knn_rows.mean()) / knn_rows.std()
    fit_metrics: dict[str, Any] = {
        "human_data": "taxonomy proxy (not human)" if data.is_proxy else cfg.human.triplets,
        "n_triplets": int(len(data.triplets)),
        "n_train": int(len(tr)),
        "n_heldout": int(len(va)),
        "acc_before": fit.val_acc_before,
        "acc_after": fit.val_acc_after,
        "train_acc_after": fit.train_acc_after,
        "best_epoch": fit.best_epoch,
        "knn_k": _KNN_K,
        "knn_overlap": evaluate.knn_overlap(standardized, fit.transform.apply(knn_rows), _KNN_K),
        "soft_targets": soft_source,
        "hyperparameters": {k: getattr(tcfg, k) for k in ("targets", "alpha", "lam", "lr", "optimizer", "epochs",
                                                           "batch_size", "tau", "temperature")},
        "history": fit.history,
    }
    if vice_info is not None:
        fit_metrics["vice"] = vice_info
    if search is not None:
        fit_metrics["search"] = search
    formats.write_things_triplets(store.join(plan.dir, "human_triplets.txt"), data.triplets)
    if data.probs is not None:
        formats.write_probabilities(store.join(plan.dir, "human_probabilities.npy"), data.probs)
    fit.transform.save(transform_url, {"config": tcfg.model_dump(), "history": fit.history,
                                       "best_epoch": fit.best_epoch, "metrics": fit_metrics})
    return fit.transform, fit_metrics


# ----------------------------------------------------------------------------- cluster
def plan_cluster(cfg: PipelineConfig, tfm: StageOutput) -> StagePlan:
    conf = {"cluster": cfg.cluster.model_dump(), "seed": cfg.seed}
    return _plan(cfg, "cluster", conf, [tfm.key], cluster, kmeans_torch, store)


def run_cluster(cfg: PipelineConfig, tfm: StageOutput) -> StageOutput:
    """Stage 2: k-means of the (transformed) store; agreement with the source's labels."""
    plan = plan_cluster(cfg, tfm)
    return _once(cfg, plan, lambda: _cluster(cfg, tfm, plan))


def _cluster(cfg: PipelineConfig, tfm: StageOutput, plan: StagePlan) -> StageOutput:
    """Stage 2's work, under its lock."""
    t0 = time.perf_counter()
    res = cluster.run_kmeans(tfm.artifact, cfg.cluster, cfg.seed)
    summary = cluster.save_kmeans(res, plan.dir)
    metrics: dict[str, Any] = {k: summary[k] for k in ("k", "sizes", "inertia", "inertia_curve")}
    labels = sources.source_from_config(cfg.source).labels()
    ok = (res.assignments >= 0) & (labels != "")
    if ok.any():
        metrics.update(evaluate.cluster_agreement(labels[ok], res.assignments[ok]))
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return _finish(plan, store.join(plan.dir, "assignments.npy"), metrics,
                   {"cluster": cfg.cluster.model_dump()}, [tfm.key])


# ----------------------------------------------------------------------------- sample
class SamplingPlan(BaseModel):
    """Everything a shard worker needs: paths and shard specs, no arrays."""

    model_config = ConfigDict(frozen=True)
    plan: StagePlan
    store_url: str
    groups_urls: dict[str, str]
    names: dict[str, str]
    specs: list[dict[str, Any]]
    publish_url: str  # the version directory <root>/datasets/<name>/<key>
    folder: str  # the official transform folder inside it, where the .npz files are
    code_version: str
    inputs: list[str]


def sampling_name(strategy: str, k: int) -> str:
    """The official file name of a sampling: cluster strategies carry k (`cluster_border_500`)."""
    return f"{strategy}_{k}" if strategy.startswith("cluster") else strategy


def plan_sample(cfg: PipelineConfig, tfm: StageOutput, clu: StageOutput) -> SamplingPlan:
    """Plan the sampling stage and write the group files its shards read (cheap, idempotent)."""
    s = cfg.sample
    conf = {"sample": s.model_dump(exclude={"n_workers", "dask_address"}), "seed": cfg.seed,
            "source": _source_identity(cfg)}
    code = (sampling, teacher, dataset, formats, store)
    plan = _plan(cfg, "sample", conf, [tfm.key, clu.key], *code)
    src = sources.source_from_config(cfg.source)
    valid = embedding_store.open_embeddings(tfm.artifact)["valid"][:]
    labels = src.labels()
    class_groups = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    class_groups[(labels == "") | ~valid] = -1
    cluster_groups = store.read_npy(clu.artifact, "cluster assignments").astype(np.int64)
    names, groups_urls = {}, {}
    store.makedirs(plan.dir)
    for strategy in s.strategies:
        by_cluster = strategy.startswith("cluster")
        names[strategy] = sampling_name(strategy, cfg.cluster.k)
        url = store.join(plan.dir, f"groups_{'cluster' if by_cluster else 'class'}.npy")
        if not store.exists(url):
            store.write_npy(url, cluster_groups if by_cluster else class_groups)
        groups_urls[strategy] = url
    specs = dataset.plan_shards(list(s.strategies), s.n_train, s.n_valid, s.shard_size, cfg.seed)
    folder = TRANSFORMED_FOLDER if cfg.transform.enabled else UNTRANSFORMED_FOLDER
    publish_url = versions.version_dir(cfg.root, cfg.dataset_name, plan.key)
    return SamplingPlan(plan=plan, store_url=tfm.artifact, groups_urls=groups_urls, names=names,
                        specs=[vars(sp) for sp in specs], publish_url=publish_url, folder=folder,
                        code_version=store.code_version(*code), inputs=[tfm.key, clu.key])


def shard_done(sp: SamplingPlan, spec: dict[str, Any]) -> bool:
    return store.exists(store.join(sp.plan.dir, "shards", f"{dataset.ShardSpec(**spec).name}.npz"))


def run_sample_shard(sp: SamplingPlan, spec: dict[str, Any]) -> str:
    """One shard: sample, teacher similarities, order; written atomically (skipped when present)."""
    s = dataset.ShardSpec(**spec)
    with store.disk_full_as_store_error(sp.plan.dir):
        return dataset.run_shard(s, sp.groups_urls[s.strategy], sp.store_url, sp.plan.dir)


def publish_sample(cfg: PipelineConfig, sp: SamplingPlan) -> StageOutput:
    """Assemble finished shards into the official `.npz` files of a new dataset version
    (`<root>/datasets/<name>/<key>/<folder>/`), published by one atomic rename with a manifest
    naming the config, input keys and code version.

    Holds the stage's writer lock; temporary dataset folders of an earlier, killed publication are
    removed first (they were never visible under the published name)."""
    if (done := _reuse(sp.plan)) is not None and store.exists(done.artifact):
        return done
    with lock.stage_lock(sp.plan.dir, cfg.lock_timeout), store.disk_full_as_store_error(sp.publish_url):
        if (done := _reuse(sp.plan)) is not None and store.exists(done.artifact):
            return done
        store.remove_temporaries(sp.plan.dir)  # shards cut by a kill (every shard of this key is finished)
        store.remove_temporaries_of(sp.publish_url)  # a publication cut by a kill (never visible)
        src = sources.source_from_config(cfg.source)
        specs = [dataset.ShardSpec(**d) for d in sp.specs]
        extra = {"dataset_name": cfg.dataset_name, "version": sp.plan.key, "published_at": versions.now_utc(),
                 "inputs": {"transform": sp.inputs[0], "cluster": sp.inputs[1]}, "code_version": sp.code_version,
                 "config": cfg.model_dump(mode="json")}
        manifest = dataset.assemble_dataset(sp.plan.dir, specs, src.ids(), sp.publish_url, sp.names,
                                            subfolder=sp.folder, extra=extra)
        metrics = {
            "publish_url": sp.publish_url,
            "version": sp.plan.key,
            "files": manifest["files"],
            "n_triplets": int(sum(f["n_triplets"] for f in manifest["files"].values())),
            # wall time from planning (when the group files were written) to publication
            "seconds": round(time.time() - min(_mtime(u) for u in sp.groups_urls.values()), 2),
        }
        return _finish(sp.plan, store.join(sp.publish_url, sp.folder), metrics, {"sample": cfg.sample.model_dump()},
                       sp.inputs)


def promote_dataset(cfg: PipelineConfig, ds: StageOutput) -> dict[str, Any]:
    """Point the dataset's `latest` at the version `ds` published (or reused), then apply
    `keep_versions`. Returns {version, path, removed}."""
    version = ds.key  # a version is named by the sampling stage's content key
    versions.set_latest(cfg.root, cfg.dataset_name, version)
    removed = versions.apply_retention(cfg.root, cfg.dataset_name, cfg.keep_versions)
    log.info("dataset %s: latest is %s%s", cfg.dataset_name, version, f"; removed {removed}" if removed else "")
    return {"version": version, "path": versions.version_dir(cfg.root, cfg.dataset_name, version), "removed": removed}


def _mtime(url: str) -> float:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.modified(path).timestamp()


# ----------------------------------------------------------------------------- distill
class DistillFiles(BaseModel):
    """The official-format files a distillation run reads."""

    folder: str
    sampling: str  # the training file's sampling name: train_<sampling>.npz
    train: str
    valid: dict[str, str]  # sampling name → valid_<sampling>.npz
    key: str  # identity of the input: the sampling stage's key, or a fingerprint of foreign files


def distill_files(cfg: PipelineConfig, ds: StageOutput | None) -> DistillFiles:
    """Where stage 4's triplets are: `distill.dataset` when set, else the published dataset `ds`."""
    d = cfg.distill
    if d.dataset is None and ds is None:
        raise ConfigError("distill.dataset: no dataset to train on; give a folder of AligNet .npz files "
                          "or run the sampling stage first")
    folder = d.dataset if d.dataset is not None else ds.artifact  # type: ignore[union-attr]
    name = d.sampling or sampling_name(d.strategy, cfg.cluster.k)
    train = store.join(folder, f"train_{name}.npz")
    fs, path = fsspec.core.url_to_fs(folder)
    if not store.exists(train):
        have = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/train_*.npz"))
        raise InputError(f"distill.dataset: {train!r} does not exist (found {have or 'no train_*.npz'}); "
                         "set distill.sampling or distill.strategy to one of the files")
    valid = {}
    for p in sorted(fs.glob(f"{path}/valid_*.npz")):
        base = p.rsplit("/", 1)[-1]
        valid[base[len("valid_"):-len(".npz")]] = store.join(folder, base)
    if d.dataset is None:
        key = ds.key  # type: ignore[union-attr]
    else:  # a foreign folder: its files' names, sizes and modification times
        ident = [(u, fs.size(fsspec.core.url_to_fs(u)[1]), _mtime(u)) for u in [train, *valid.values()]]
        key = store.content_key("distill-input", ident)
    return DistillFiles(folder=folder, sampling=name, train=train, valid=valid, key=key)


def plan_distill(cfg: PipelineConfig, files: DistillFiles) -> StagePlan:
    conf = {"distill": cfg.distill.model_dump(), "seed": cfg.seed, "source": _source_identity(cfg)}
    return _plan(cfg, "distill", conf, [files.key], distill, models, store)


def _read_split(cfg: PipelineConfig, url: str, src: sources.ImageSource) -> formats.AlignetTriplets:
    if cfg.distill.join == "filenames":
        return distill.join_by_filenames(formats.read_alignet_npz(url), src, url)
    return formats.read_alignet_npz(url, len(src))


class HumanTest(BaseModel):
    """Held-out human (or proxy) triplets over objects, for zero-shot odd-one-out accuracy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) object ids, odd one in column 2
    object_of_image: np.ndarray  # (n,) object id of each image, -1 for none
    is_proxy: bool


def human_test_split(cfg: PipelineConfig, src: sources.ImageSource) -> HumanTest | None:
    """The held-out human triplets of the transform stage (same split), or None without human data."""
    if cfg.human.triplets is None and cfg.source.kind != "demo":
        return None
    data = load_human_data(cfg, src)
    _, va = human.split_triplets(len(data.triplets), cfg.transform.val_fraction, cfg.seed)
    return HumanTest(triplets=data.triplets[va], object_of_image=data.object_of_image, is_proxy=data.is_proxy)


def run_distill(
    cfg: PipelineConfig,
    ds: StageOutput | None,
    progress: Callable[[int, float], None] | None = None,
) -> StageOutput:
    """Stage 4: finetune the student on official-format triplets (the pipeline's own, or a folder
    given as `distill.dataset`); triplet accuracy vs the teacher and human odd-one-out accuracy,
    before and after. `progress(step, loss)` is called after every training step."""
    files = distill_files(cfg, ds)
    plan = plan_distill(cfg, files)
    # training resumes from its own checkpoints: no temporaries to clear
    return _once(cfg, plan, lambda: _distill(cfg, files, plan, progress), clean=False)


def _distill(
    cfg: PipelineConfig, files: DistillFiles, plan: StagePlan, progress: Callable[[int, float], None] | None
) -> StageOutput:
    """Stage 4's work, under its lock (training resumes from its own checkpoints)."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    src = sources.source_from_config(cfg.source)
    train = _read_split(cfg, files.train, src)
    valids = {name: _read_split(cfg, url, src) for name, url in files.valid.items()}
    test = human_test_split(cfg, src)
    d = cfg.distill
    student = distill.build_student(d, cfg.seed)  # "before": the pretrained backbone's own features
    before, human_before = _student_accuracy(student, valids, test, src, device, False, d.n_eval, d.num_workers)
    del student
    log_ = distill.train_student(train, src, d, plan.dir, device, cfg.seed, progress)
    trained = distill.load_student(plan.dir, d)
    after, human_after = _student_accuracy(trained, valids, test, src, device, True, d.n_eval, d.num_workers)
    metrics = {
        "dataset": files.folder,
        "sampling": files.sampling,
        "n_train": len(train),
        "acc_before": before,
        "acc_after": after,
        "human_acc_before": human_before,
        "human_acc_after": human_after,
        "human_data": None if test is None else ("taxonomy proxy (not human)" if test.is_proxy else cfg.human.triplets),
        "n_human_test": 0 if test is None else int(len(test.triplets)),
        "steps": log_["steps"],
        "final_loss": log_["final_loss"],
        "loss_curve": log_["loss_curve"],
        "train_seconds": log_["seconds"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return _finish(plan, plan.dir, metrics, {"distill": d.model_dump()}, [files.key])


def _student_accuracy(
    model: distill.TripletStudent,
    valids: dict[str, formats.AlignetTriplets],
    test: HumanTest | None,
    src: sources.ImageSource,
    device: Any,
    use_head: bool,
    n_eval: int,
    num_workers: int,
) -> tuple[dict[str, float], float | None]:
    """Triplet accuracy vs the teacher on the first `n_eval` held-out rows of each sampling, and
    odd-one-out accuracy on the held-out human triplets (object = mean of its images), embedding
    each image the evaluation needs once."""
    needed = [v.indices[:n_eval].ravel() for v in valids.values()]
    objs = np.zeros(0, dtype=np.int64)
    if test is not None:
        objs = np.unique(test.triplets)
        needed.append(np.flatnonzero(np.isin(test.object_of_image, objs)))
    rows = np.unique(np.concatenate(needed)) if needed else np.zeros(0, dtype=np.int64)
    emb = distill.embed_images(model, [src.records[int(r)].path for r in rows], device, use_head=use_head,
                               num_workers=num_workers)
    pool = np.zeros((len(src), emb.shape[1]), dtype=np.float32)
    pool[rows] = emb
    accs = {s: evaluate.triplet_accuracy(evaluate.pair_similarities(pool, v.indices[:n_eval]))
            for s, v in valids.items()}
    if test is None:
        return accs, None
    img = np.flatnonzero(np.isin(test.object_of_image, objs))
    obj_emb = human.object_embeddings(pool[img], np.searchsorted(objs, test.object_of_image[img]), len(objs))
    return accs, evaluate.odd_one_out_accuracy(obj_emb, np.searchsorted(objs, test.triplets))


# ----------------------------------------------------------------------------- report
def summarize(cfg: PipelineConfig, outs: dict[str, StageOutput]) -> dict[str, Any]:
    """The machine-readable summary of one pipeline run (written as summary.json)."""
    t, c, s = outs["transform"].metrics, outs["cluster"].metrics, outs["sample"].metrics
    d = outs["distill"].metrics if "distill" in outs else {}
    strategy = d.get("sampling", cfg.distill.strategy)
    return {
        "dataset": outs["sample"].artifact,
        "dataset_version": s.get("version"),
        "transform_acc_before": t.get("acc_before"),
        "transform_acc_after": t.get("acc_after"),
        "human_data": t.get("human_data"),
        "cluster_nmi": c.get("nmi"),
        "cluster_ari": c.get("ari"),
        "cluster_sizes": c.get("sizes"),
        "n_triplets": s.get("n_triplets"),
        "dataset_files": s.get("files"),
        "student_strategy": strategy,
        "student_acc_before": d.get("acc_before", {}).get(strategy),
        "student_acc_after": d.get("acc_after", {}).get(strategy),
        "student_human_acc_before": d.get("human_acc_before"),
        "student_human_acc_after": d.get("human_acc_after"),
        "student_acc_before_by_sampling": d.get("acc_before"),
        "student_acc_after_by_sampling": d.get("acc_after"),
        "stage_seconds": {name: o.metrics.get("seconds") for name, o in outs.items()},
        "stage_keys": {name: o.key for name, o in outs.items()},
    }


def render_report(summary: dict[str, Any]) -> str:
    """A short markdown report of a run (also published as a Prefect artifact)."""
    def pct(x: Any) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "# AligNet pipeline report",
        "",
        f"Dataset: `{summary['dataset']}` ({summary['n_triplets']} triplets)",
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| teacher held-out odd-one-out accuracy ({summary['human_data']}) | {pct(summary['transform_acc_before'])} "
        f"| {pct(summary['transform_acc_after'])} |",
        f"| student triplet accuracy vs teacher ({summary['student_strategy']}) | "
        f"{pct(summary['student_acc_before'])} | {pct(summary['student_acc_after'])} |",
        f"| student odd-one-out accuracy on held-out human triplets ({summary['human_data']}) | "
        f"{pct(summary['student_human_acc_before'])} | {pct(summary['student_human_acc_after'])} |",
        "",
        "Clusters vs labels: " + ("no labels" if summary["cluster_nmi"] is None else
                                  f"NMI {summary['cluster_nmi']:.3f}, ARI {summary['cluster_ari']:.3f}"),
        "",
        "| stage | seconds | key |",
        "|---|---|---|",
    ]
    for name, sec in summary["stage_seconds"].items():
        lines.append(f"| {name} | {sec} | `{summary['stage_keys'][name]}` |")
    return "\n".join(lines) + "\n"


def write_report(cfg: PipelineConfig, outs: dict[str, StageOutput]) -> dict[str, Any]:
    """Write `<root>/reports/<dataset>/<last key>/{report.md,summary.json}`; return the summary
    (with `report_dir` and the markdown under `report_markdown`)."""
    summary = summarize(cfg, outs)
    last = outs.get("distill", outs["sample"])
    folder = store.join(cfg.root, "reports", cfg.dataset_name, last.key)
    summary["report_dir"] = folder
    text = render_report(summary)
    store.write_json_atomic(store.join(folder, "summary.json"), summary)
    with fsspec.open(store.join(folder, "report.md"), "w") as f:
        f.write(text)
    return {**summary, "report_markdown": text}


# ----------------------------------------------------------------------------- preflight
def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before any work: inputs exist, names resolve, sizes fit.

    Raises `ConfigError` / `InputError` naming the field or path and what is expected."""
    import timm

    src = sources.source_from_config(cfg.source)
    n = len(src)
    if cfg.embed.devices is not None:
        resolve_devices(cfg.embed.devices)
    for field, name in (("embed.model", cfg.embed.model), ("distill.student", cfg.distill.student)):
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise ConfigError(f"{field}: unknown timm model {name!r}" + (f"; close matches: {close}" if close else ""))
    for section, name, weights, needed in (("embed", cfg.embed.model, cfg.embed.weights, True),
                                           ("distill", cfg.distill.student, cfg.distill.weights, cfg.distill.enabled)):
        try:
            if needed:
                models.resolve_weights(name, weights)
        except InputError as err:  # "weights: ..." → "embed.weights: ...", naming the section
            raise InputError(f"{section}.{err}" if str(err).startswith("weights:") else str(err)) from None
    if cfg.distill.enabled:
        if cfg.distill.dataset is not None and not store.exists(cfg.distill.dataset):
            raise InputError(f"distill.dataset: folder {cfg.distill.dataset!r} does not exist")
        if cfg.distill.dataset is None and cfg.distill.strategy not in cfg.sample.strategies:
            raise ConfigError(f"distill.strategy: {cfg.distill.strategy!r} must be one of sample.strategies "
                              f"{list(cfg.sample.strategies)}")
    if cfg.cluster.k > n:
        raise ConfigError(f"cluster.k: {cfg.cluster.k} clusters for {n} images; k must be at most the number of images")
    h = cfg.human
    for field in ("triplets", "probabilities", "objects"):
        path = getattr(h, field)
        if path is not None and not store.exists(path):
            raise InputError(f"human.{field}: file {path!r} does not exist")
    if h.probabilities and not h.triplets:
        raise ConfigError("human.probabilities: given without human.triplets")
    if h.triplets is None and cfg.source.kind != "demo" and cfg.transform.enabled:
        raise ConfigError("human.triplets: a THINGS-format triplet file is required unless source.kind is 'demo' "
                          "or transform.enabled is false")
    if len(set(cfg.sample.strategies)) != len(cfg.sample.strategies):
        raise ConfigError(f"sample.strategies: duplicates in {list(cfg.sample.strategies)}")
    resolve_device(cfg.device)
    if cfg.embed.layers:
        import torch

        with torch.device("meta"):  # the module tree only: no weights, no memory
            names = {name for name, _ in timm.create_model(cfg.embed.model, pretrained=False).named_modules()}
        unknown = [name for name in cfg.embed.layers if name not in names or not name]
        if unknown:
            raise ConfigError(f"embed.layers: {unknown} are not modules of {cfg.embed.model!r}; expected names "
                              "as in model.named_modules(), e.g. 'blocks.3'")
    d = cfg.distill
    if d.enabled and d.batch_triplets % d.grad_accum:
        raise ConfigError(f"distill.grad_accum: {d.grad_accum} must divide distill.batch_triplets "
                          f"({d.batch_triplets}) into equal micro-batches")
    if h.triplets is not None:  # read and check the human data now, not after hours of embedding
        try:
            load_human_data(cfg, src)
        except InputError as err:
            field = next((f for f in ("probabilities", "objects") if getattr(h, f) and getattr(h, f) in str(err)),
                         "triplets")
            raise InputError(f"human.{field}: {err}") from None

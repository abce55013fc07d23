"""Stage 3, sample: triplets sampled shard by shard (in parallel on Dask), labelled by the
transformed teacher, published as a new dataset version in the official AligNet `.npz` format.

In: the transform stage's store and the cluster stage's assignments (plus the source's labels for
the class strategies and its ids for the files' `filenames`). Out: finished shards under
`<dir>/shards/`, then `<root>/datasets/<name>/<key>/<folder>/{train,valid}_<sampling>.npz` (and
their Zarr copy and manifest) published by one rename; `promote_dataset` points `latest` at it.
`plan_sample` writes the group files its shards read; `run_sample_shard` is one shard (a Dask
task); `publish_sample` assembles them. Which workers run the shards changes no output, so
`sample.n_workers` and `sample.dask_address` are not in the key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.human.heldout import excluded_images
from alignet_core.io import embedding_store, lock, sources, store
from alignet_core.io.formats import sampling_name
from alignet_core.io.redact import redact
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, plan_stage, reuse
from alignet_core.sample import versions
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import ShardSpec, plan_shards, run_shard, shard_path

log = logging.getLogger(__name__)

TRANSFORMED_FOLDER = "uncertainty_distillation"
UNTRANSFORMED_FOLDER = "untransformed"


class DatasetFile(Record):
    """One published `.npz` file, as the dataset's manifest lists it."""

    strategy: str
    split: str
    path: str
    n_triplets: int
    sha256: str
    arrays_sha256: str
    duplicates_drawn: int = 0  # draws that repeated a triplet (removed; the split was topped up)
    top_up_shards: int = 0  # shards drawn after the planned ones to reach the count asked


class SampleMetrics(StageMetrics):
    publish_url: str
    version: str
    files: dict[str, DatasetFile]
    n_triplets: int


class SampleOutput(StageOutput):
    metrics: SampleMetrics


class SamplingPlan(Record):
    """Everything a shard worker needs: paths and shard specs, no arrays."""

    plan: StagePlan
    store_url: str
    groups_urls: dict[str, str]
    names: dict[str, str]
    specs: list[dict[str, Any]]
    publish_url: str  # the version directory <root>/datasets/<name>/<key>
    folder: str  # the official transform folder inside it, where the .npz files are
    inputs: list[str]
    pin: str | None = None  # this run's pin on the version (`reserve_version`), released by promotion
    planned_at: float = 0.0  # when this attempt planned the stage (time.time()): its `seconds` start there


class Promotion(Record):
    """What `promote_dataset` did: the version now `latest`, its folder, versions retention removed."""

    version: str
    path: str
    removed: list[str]


def _stage_plan(cfg: PipelineConfig, tfm: StageOutput, clu: StageOutput) -> StagePlan:
    """The stage's key and directory (no files read or written). The human section is in the key: its
    test fold decides which images the sampler leaves out (`human.heldout`)."""
    conf = {"sample": cfg.sample.key_dump(), "seed": cfg.seed,
            "source": sources.source_identity(cfg.source), "human": cfg.human.key_dump(),
            **sources.labels_entry(cfg.source)}  # the class groups (between_class) and the proxy's folds
    return plan_stage(cfg.root, "sample", conf, [tfm.key, clu.key], __name__)


def plan_sample(ctx: RunContext, tfm: StageOutput, clu: StageOutput) -> SamplingPlan:
    """Plan the sampling stage and write the group files its shards read (cheap, idempotent).

    Under `human.teacher: heldout` the images of the human test fold's objects are ineligible (group -1)
    for every strategy and split (`human.heldout`): the student never trains on them."""
    cfg, src = ctx.cfg, ctx.source
    s = cfg.sample
    plan = ctx.plan(_stage_plan, tfm, clu)
    valid = embedding_store.open_embeddings(tfm.artifact)["valid"][:]
    labels = src.labels()
    class_groups = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    class_groups[(labels == "") | ~valid] = -1
    cluster_groups = store.read_npy(clu.artifact, "cluster assignments").astype(np.int64)
    held_out = excluded_images(cfg, ctx.human)
    class_groups[held_out] = -1
    cluster_groups[held_out] = -1
    if len(held_out):
        log.info("sample: %d images of the human test fold left out of every triplet (human.teacher: heldout)",
                 len(held_out))
    names, groups_urls = {}, {}
    store.makedirs(plan.dir)
    for strategy in s.strategies:
        by_cluster = strategy.startswith("cluster")
        names[strategy] = sampling_name(strategy, cfg.cluster.k)
        url = store.join(plan.dir, f"groups_{'cluster' if by_cluster else 'class'}.npy")
        if not store.exists(url):
            store.write_npy(url, cluster_groups if by_cluster else class_groups)
        groups_urls[strategy] = url
    specs = plan_shards(list(s.strategies), s.n_train, s.n_valid, s.shard_size, cfg.seed)
    folder = TRANSFORMED_FOLDER if cfg.transform.enabled else UNTRANSFORMED_FOLDER
    return SamplingPlan(plan=plan, store_url=tfm.artifact, groups_urls=groups_urls, names=names,
                        specs=[vars(sp) for sp in specs], publish_url=versions.version_dir(cfg.root, cfg.dataset_name, plan.key),
                        folder=folder, inputs=[tfm.key, clu.key], planned_at=time.time())


def run_sample(ctx: RunContext, tfm: StageOutput, clu: StageOutput) -> SampleOutput:
    """The whole stage in this process, without Dask: plan, every missing shard, publish, promote."""
    sp = reserve_version(ctx.cfg, plan_sample(ctx, tfm, clu))
    if not publish_complete(sp):
        for spec in sp.specs:
            run_sample_shard(sp, spec)
    ds = publish_sample(ctx, sp)
    promote_dataset(ctx.cfg, ds, sp.pin)
    return ds


def shard_done(sp: SamplingPlan, spec: dict[str, Any]) -> bool:
    return store.exists(shard_path(sp.plan.dir, ShardSpec(**spec)))


def run_sample_shard(sp: SamplingPlan, spec: dict[str, Any]) -> str:
    """One shard: sample, teacher similarities, order; written atomically (skipped when present)."""
    s = ShardSpec(**spec)
    with store.disk_full_as_store_error(sp.plan.dir):
        return run_shard(s, sp.groups_urls[s.strategy], sp.store_url, sp.plan.dir)


def publish_complete(sp: SamplingPlan) -> bool:
    """True when the stage's manifest and the published folder both exist."""
    return store.is_complete(sp.plan.dir) and store.exists(store.join(sp.publish_url, sp.folder))


def reuse_sample(sp: SamplingPlan) -> SampleOutput | None:
    """The published output when the stage is complete and its dataset folder is there (else None);
    its `publish_url` is this plan's, so a moved root hands on where the version is now."""
    done = reuse(sp.plan, SampleOutput)
    if done is None or not store.exists(done.artifact):
        return None
    return done.model_copy(update={"metrics": done.metrics.model_copy(update={"publish_url": sp.publish_url})})


def publish_sample(ctx: RunContext, sp: SamplingPlan) -> SampleOutput:
    """Assemble finished shards into the official `.npz` files of a new dataset version
    (`<root>/datasets/<name>/<key>/<folder>/`), published by one atomic rename with a manifest
    naming the config, input keys and code version.

    Holds the stage's writer lock; temporary dataset folders of an earlier, killed publication are
    removed first (they were never visible under the published name)."""
    cfg = ctx.cfg
    if (done := reuse_sample(sp)) is not None:
        return done
    with lock.stage_lock(sp.plan.dir, cfg.lock_timeout), store.disk_full_as_store_error(sp.publish_url):
        if (done := reuse_sample(sp)) is not None:
            return done
        store.remove_temporaries(sp.plan.dir)  # shards cut by a kill (every shard of this key is finished)
        store.remove_temporaries_of(sp.publish_url)  # a publication cut by a kill (never visible)
        src = ctx.source
        specs = [ShardSpec(**d) for d in sp.specs]
        extra = {"dataset_name": cfg.dataset_name, "version": sp.plan.key, "published_at": versions.now_utc(),
                 "inputs": {"transform": sp.inputs[0], "cluster": sp.inputs[1]}, "code_version": sp.plan.code_version,
                 "config": redact(cfg.model_dump(mode="json"))}
        manifest = assemble_dataset(sp.plan.dir, specs, src.ids(), sp.publish_url, sp.names,
                                    subfolder=sp.folder, extra=extra,
                                    top_up=lambda spec: run_sample_shard(sp, vars(spec)),
                                    workers=cfg.sample.n_workers)
        files = {name: DatasetFile(**{k: info[k] for k in DatasetFile.model_fields})
                 for name, info in manifest["files"].items()}
        metrics = SampleMetrics(
            publish_url=sp.publish_url,
            version=sp.plan.key,
            files=files,
            n_triplets=int(sum(f.n_triplets for f in files.values())),
            seconds=round(time.time() - sp.planned_at, 2),  # this attempt's, from its planning to publication
        )
        return finish(sp.plan, SampleOutput, store.join(sp.publish_url, sp.folder), metrics,
                      {"sample": cfg.sample.model_dump()}, sp.inputs)


def reserve_version(cfg: PipelineConfig, sp: SamplingPlan) -> SamplingPlan:
    """`sp` holding a pin on the version it will publish or reuse: no other run's retention deletes
    that version before this run's `promote_dataset` (which drops the pin)."""
    return sp.model_copy(update={"pin": versions.pin(cfg.root, cfg.dataset_name, sp.plan.key)})


def promote_dataset(cfg: PipelineConfig, ds: SampleOutput, pin: str | None = None) -> Promotion:
    """Point the dataset's `latest` at the version `ds` published (or reused), then apply `keep_versions`,
    both under the dataset's lock; `pin` (from `reserve_version`) is released there."""
    version = ds.key  # a version is named by the sampling stage's content key
    removed = versions.promote(cfg.root, cfg.dataset_name, version, cfg.keep_versions, pin, cfg.lock_timeout)
    log.info("dataset %s: latest is %s%s", cfg.dataset_name, version, f"; removed {removed}" if removed else "")
    return Promotion(version=version, path=versions.version_dir(cfg.root, cfg.dataset_name, version), removed=removed)

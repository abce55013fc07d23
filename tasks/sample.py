"""Tasks: plan sampling, one task per shard (fanned out on Dask), publish the dataset (stage 3)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignet_core.cluster.stage import ClusterOutput
from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.runtime.progress import ProgressLog
from alignet_core.sample.render import dataset_location, dataset_rows
from alignet_core.sample.stage import (
    SampleOutput,
    SamplingPlan,
    plan_sample,
    promote_dataset,
    publish_complete,
    publish_sample,
    reserve_version,
    reuse_sample,
    run_sample_shard,
    shard_done,
)
from alignet_core.transform.stage import TransformOutput
from tasks._cache import RESULT_SERIALIZER, Located, StageCache
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


@task(name="plan-sampling", cache_policy=NO_CACHE)
def plan_sampling(ctx: RunContext, tfm: TransformOutput, clu: ClusterOutput) -> SamplingPlan:
    """Plan the shards and pin the version this run will promote (no other run's retention deletes it)."""
    return reserve_version(ctx.cfg, plan_sample(ctx, tfm, clu))


def _shard(sp: SamplingPlan, index: int) -> Located:
    """A shard: (stage key, shard number), complete when its file exists."""
    done = shard_done(sp, sp.specs[index])
    return Located(key=f"{sp.plan.key}-{index}", dir=sp.plan.dir, complete=done,
                   expected=lambda: run_sample_shard(sp, sp.specs[index]) if done else None)


@task(name="sample-shard", cache_policy=StageCache(locate=_shard),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def sample_shard(sp: SamplingPlan, index: int) -> str:
    return run_sample_shard(sp, sp.specs[index])


def _published(sp: SamplingPlan) -> Located:
    """The published version: complete when the stage's manifest and the dataset folder exist."""
    return Located(key=sp.plan.key, dir=sp.plan.dir, complete=publish_complete(sp),
                   expected=lambda: reuse_sample(sp))


@task(name="publish-dataset", cache_policy=StageCache(locate=_published),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_condition_fn=retry_unless_user_error)
def publish(ctx: RunContext, sp: SamplingPlan) -> SampleOutput:
    return publish_sample(ctx, sp)


@task(name="promote-dataset", cache_policy=NO_CACHE)
def promote(cfg: PipelineConfig, ds: SampleOutput, sp: SamplingPlan) -> SampleOutput:
    """Make this run's version `latest` (even when it was a cache hit) and apply retention, under the
    dataset's lock, releasing the version's pin."""
    promote_dataset(cfg, ds, sp.pin)
    return ds


def dataset_artifacts(cfg: PipelineConfig, ds: SampleOutput) -> None:
    """`dataset-files` (every file with the sha256 `alignet datasets verify` checks) and `dataset-location`
    (host and absolute path, a link that opens) on the calling flow run: the top-level run an operator
    opens, not only the sampling subflow."""
    link, where = dataset_location(ds.artifact)
    files = ds.metrics.files
    create_table_artifact(key="dataset-files", table=dataset_rows(ds),
                          description=f"Dataset {cfg.dataset_name!r}, version {ds.metrics.version}: "
                                      f"{ds.metrics.n_triplets:,} triplets in {len(files)} files at {where}; "
                                      "`alignet datasets verify` checks each file against its sha256")
    create_link_artifact(key="dataset-location", link=link, link_text=where,
                         description=f"Dataset {cfg.dataset_name!r}, version {ds.metrics.version} (latest)")


def submit_shards(sp: SamplingPlan) -> list[Any]:
    """Submit every shard to the flow's task runner (futures)."""
    return [sample_shard.submit(sp, i) for i in range(len(sp.specs))]


def follow_shards(sp: SamplingPlan, shards: list[Any]) -> None:
    """Wait for the shards in submission order (which is roughly the order they finish in) with a
    `sample-progress` artifact and progress lines: shards done, rate, time left. The first failed shard
    (after its retries) raises its error."""
    with progress_artifact("sample-progress", "sample"):
        lines = ProgressLog("sample", "shards", len(shards))
        n_triplets = sum(int(spec["n"]) for spec in sp.specs)
        lines.update(0, f" ({n_triplets:,} triplets drawn on {len(shards)} shards)")
        for i, shard in enumerate(shards, 1):
            shard.result()  # a failed shard raises its own error here (publishing would only see None)
            lines.update(i)

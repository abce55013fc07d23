"""Tasks: plan sampling, one task per shard (fanned out on Dask), publish the dataset (stage 3)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignet_core.io import store

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call, cached_submit


@task(name="plan-sampling", cache_policy=NO_CACHE)
def plan_sampling(cfg: PipelineConfig, tfm: stages.StageOutput, clu: stages.StageOutput) -> stages.SamplingPlan:
    return stages.plan_sample(cfg, tfm, clu)


@task(name="sample-shard", persist_result=True, retries=2, retry_delay_seconds=2)
def sample_shard_task(sp: stages.SamplingPlan, spec: dict[str, Any]) -> str:
    return stages.run_sample_shard(sp, spec)


@task(name="publish-dataset", persist_result=True, retries=1)
def publish_task(cfg: PipelineConfig, sp: stages.SamplingPlan) -> stages.StageOutput:
    out = stages.publish_sample(cfg, sp)
    files = out.metrics.get("files", {})
    create_table_artifact(
        key="dataset-files",
        table=[{"file": name, **{k: v for k, v in info.items() if k != "sha256"}} for name, info in files.items()],
        description=f"Published AligNet dataset ({out.metrics['n_triplets']} triplets)",
    )
    return out


@task(name="promote-dataset", cache_policy=NO_CACHE)
def promote(cfg: PipelineConfig, ds: stages.StageOutput) -> stages.StageOutput:
    """Make this run's version `latest` (even when it was a cache hit) and apply retention."""
    info = stages.promote_dataset(cfg, ds)
    link = ds.artifact if "://" in ds.artifact else f"file://{ds.artifact}"
    removed = f"; retention removed {info['removed']}" if info["removed"] else ""
    create_link_artifact(key="dataset-location", link=link, link_text=ds.artifact,
                         description=f"Dataset {cfg.dataset_name!r}, version {info['version']} (now latest){removed}")
    return ds


def submit_shards(sp: stages.SamplingPlan) -> list[Any]:
    """Submit every shard to the task runner; cache key = (stage key, shard name)."""
    return [
        cached_submit(sample_shard_task, f"{sp.plan.key}-{i}", stages.shard_done(sp, spec), sp, spec)
        for i, spec in enumerate(sp.specs)
    ]


def publish(cfg: PipelineConfig, sp: stages.SamplingPlan, wait_for: list[Any]) -> stages.StageOutput:
    complete = store.is_complete(sp.plan.dir) and store.exists(store.join(sp.publish_url, sp.folder))
    return cached_call(publish_task, sp.plan.key, complete, cfg, sp, wait_for=wait_for)

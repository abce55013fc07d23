"""Task: superordinate clusters by k-means (stage 2)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from alignet_core import stages, store
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


@task(name="cluster", persist_result=True, retries=1, retry_delay_seconds=5)
def cluster_task(cfg: PipelineConfig, tfm: stages.StageOutput) -> stages.StageOutput:
    out = stages.run_cluster(cfg, tfm)
    m = out.metrics
    create_table_artifact(
        key="cluster-sizes",
        table=[{"cluster": i, "size": s} for i, s in enumerate(m["sizes"])],
        description=f"k-means, k={m['k']}: NMI {m.get('nmi')}, ARI {m.get('ari')} against the source labels",
    )
    return out


def cluster(cfg: PipelineConfig, tfm: stages.StageOutput) -> stages.StageOutput:
    plan = stages.plan_cluster(cfg, tfm)
    return cached_call(cluster_task, plan.key, store.is_complete(plan.dir), cfg, tfm)

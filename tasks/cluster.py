"""Task: superordinate clusters by k-means (stage 2)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core.cluster.render import cluster_markdown
from alignet_core.cluster.stage import ClusterOutput, plan_cluster, run_cluster
from alignet_core.context import RunContext
from alignet_core.transform.stage import TransformOutput
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


@task(name="cluster", cache_policy=StageCache(locate=stage_output(plan_cluster, ClusterOutput)),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def cluster(ctx: RunContext, tfm: TransformOutput) -> ClusterOutput:
    with progress_artifact("cluster-progress", "k-means fit", "k-means assign"):
        out = run_cluster(ctx, tfm)
    create_markdown_artifact(key="cluster-sizes", markdown=cluster_markdown(out),
                             description=f"k-means, k={out.metrics.k}: cluster-size distribution and agreement "
                             "with labels")
    return out

"""The cluster stage's declaration for the registry (data: no stage code is imported here)."""

from __future__ import annotations

from alignet_core.runtime.declaration import Stage

STAGE = Stage(
    name="cluster", summary="k-means clusters of the transformed embeddings", section="cluster",
    inputs=("transform",), run="alignet_core.cluster.stage:run_cluster",
    output="alignet_core.cluster.stage:ClusterOutput", deployment="kmeans-clusters",
    check="alignet_core.cluster.checks:check",
    example="--set cluster.k=50", figures="alignet_core.cluster.render:cluster_figures",
)

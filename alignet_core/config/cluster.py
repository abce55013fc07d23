"""The `cluster` section of the config (stage 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignet_core.records import ConfigModel


class ClusterConfig(ConfigModel):
    """Stage 2: superordinate clusters by k-means."""

    k: int = Field(12, gt=1, description="number of clusters")
    niter: int = Field(25, gt=0, description="k-means iterations")
    nredo: int = Field(1, gt=0, description="k-means restarts; the best objective is kept")
    spherical: bool = Field(False, description="cosine k-means (normalized centroids)")
    max_points_per_centroid: int = Field(256, gt=0, description="training subsample size per centroid")
    min_cluster_size: int = Field(
        5, ge=0, description="no cluster ends smaller: a smaller one is dissolved and re-seeded by splitting the "
        "largest (FAISS's min_points_per_centroid idea; 0 or 1: off); reported in the cluster artifact"
    )
    chunk_rows: int = Field(65536, gt=0, description="rows per chunk when assigning the store")
    use_gpu: Literal["auto", "never"] = Field(
        "auto", description="a GPU when there is one: FAISS's own, else torch's CUDA (see hardware.kmeans_backend)"
    )

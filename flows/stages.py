"""Flows for each early stage alone; later stages' inputs come from the cache or are computed."""

from __future__ import annotations

from prefect import flow

from alignet_core.cluster.stage import ClusterOutput
from alignet_core.embed.stage import EmbedOutput
from alignet_core.transform.stage import TransformOutput
from flows._config import Overrides, resolve_config
from tasks.cluster import cluster
from tasks.embed import embedded
from tasks.transform import fit_transform


@flow(name="embed")
def embed_flow(config_path: str | None = None, overrides: Overrides | None = None) -> EmbedOutput:
    """Stage 0: teacher embeddings of every image."""
    return embedded(resolve_config(config_path, overrides))


@flow(name="transform")
def transform_flow(config_path: str | None = None, overrides: Overrides | None = None) -> TransformOutput:
    """Stage 1: the human-aligned teacher transform."""
    cfg = resolve_config(config_path, overrides)
    return fit_transform(cfg, embedded(cfg))


@flow(name="cluster")
def cluster_flow(config_path: str | None = None, overrides: Overrides | None = None) -> ClusterOutput:
    """Stage 2: k-means clusters of the transformed embeddings."""
    cfg = resolve_config(config_path, overrides)
    return cluster(cfg, fit_transform(cfg, embedded(cfg)))

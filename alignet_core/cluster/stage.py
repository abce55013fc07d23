"""Stage 2, cluster: k-means of the (transformed) store into superordinate categories.

In: the transform stage's store (and the source's labels, for agreement). Out: `<dir>/assignments.npy`
(n,) int64 (-1 for invalid rows; the groups file of the cluster sampling strategies), centroids,
distances, sizes and `kmeans.json`. The key covers the k-means settings, the seed and where k-means
runs (`hardware.kmeans_backend`: FAISS on the CPU, FAISS's GPUs, or torch on CUDA), since GPU sums
are added in another order.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from alignet_core.cluster.kmeans import run_kmeans, save_kmeans
from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.hardware import kmeans_backend
from alignet_core.io import sources, store
from alignet_core.runtime.runner import StageMetrics, StageOutput, StagePlan, finish, once, plan_stage
from alignet_core.stats import metrics

log = logging.getLogger(__name__)


class ClusterMetrics(StageMetrics):
    """Cluster sizes, the k-means objective, and agreement with the source's labels when it has any."""

    k: int
    sizes: list[int]
    inertia: float
    inertia_curve: list[float]
    nmi: float | None = None
    ari: float | None = None
    min_cluster_size: int = 0
    reseeded: list[dict[str, int]] = []  # clusters below min_cluster_size, re-seeded ({cluster, size, split})


class ClusterOutput(StageOutput):
    metrics: ClusterMetrics


def plan_cluster(cfg: PipelineConfig, tfm: StageOutput) -> StagePlan:
    conf = {"cluster": cfg.cluster.key_dump(), "seed": cfg.seed,
            "backend": dataclasses.asdict(kmeans_backend(cfg.cluster.use_gpu)),
            **sources.labels_entry(cfg.source)}  # its agreement with the labels is in its metrics
    return plan_stage(cfg.root, "cluster", conf, [tfm.key], __name__)


def run_cluster(ctx: RunContext, tfm: StageOutput) -> ClusterOutput:
    """k-means of the transformed store; agreement with the source's labels."""
    plan = ctx.plan(plan_cluster, tfm)
    return once(plan, ClusterOutput, lambda: _cluster(ctx, tfm, plan), ctx.cfg.lock_timeout)


def _cluster(ctx: RunContext, tfm: StageOutput, plan: StagePlan) -> ClusterOutput:
    """The stage's work, under its lock."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    res = run_kmeans(tfm.artifact, cfg.cluster, cfg.seed)
    summary = save_kmeans(res, plan.dir)
    labels = ctx.source.labels()
    ok = (res.assignments >= 0) & (labels != "")
    if not ok.any():
        log.warning("cluster: the source's images have no labels (a flat folder?): no agreement of the clusters "
                    "with labels is reported; class folders or source.label_columns give some")
    agreement = metrics.cluster_agreement(labels[ok], res.assignments[ok]) if ok.any() else {}
    m = ClusterMetrics(k=summary["k"], sizes=summary["sizes"], inertia=summary["inertia"],
                       inertia_curve=summary["inertia_curve"], **agreement,
                       min_cluster_size=summary["min_cluster_size"], reseeded=summary["reseeded"],
                       seconds=round(time.perf_counter() - t0, 2))
    return finish(plan, ClusterOutput, store.join(plan.dir, "assignments.npy"), m,
                  {"cluster": cfg.cluster.model_dump()}, [tfm.key])

"""Task: superordinate clusters by k-means (stage 2)."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core import plots

from alignet_core.io import store

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


@task(name="cluster", persist_result=True, retries=1, retry_delay_seconds=5)
def cluster_task(cfg: PipelineConfig, tfm: stages.StageOutput) -> stages.StageOutput:
    out = stages.run_cluster(cfg, tfm)
    m = out.metrics
    sizes = np.asarray(m["sizes"])
    agreement = (f"NMI {m['nmi']:.3f}, ARI {m['ari']:.3f} against the source's labels" if "nmi" in m
                 else "no source labels to compare with")
    create_markdown_artifact(
        key="cluster-sizes",
        markdown="\n".join([
            f"# k-means, k = {m['k']}",
            "",
            f"{agreement}; inertia {m['inertia']:.4g}.",
            "",
            "| smallest | median | largest | empty |",
            "|---|---|---|---|",
            f"| {sizes.min()} | {int(np.median(sizes))} | {sizes.max()} | {int((sizes == 0).sum())} |",
            "",
            plots.markdown_image(plots.sizes_png(sizes.tolist(), f"cluster sizes (k = {m['k']})"), "cluster sizes"),
        ]),
        description=f"k-means, k={m['k']}: cluster-size distribution and agreement with labels",
    )
    return out


def cluster(cfg: PipelineConfig, tfm: stages.StageOutput) -> stages.StageOutput:
    plan = stages.plan_cluster(cfg, tfm)
    return cached_call(cluster_task, plan.key, store.is_complete(plan.dir), cfg, tfm)

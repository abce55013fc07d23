"""Task: teacher embeddings of every image (stage 0)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from alignet_core.io import store

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


@task(name="embed", persist_result=True, retries=1, retry_delay_seconds=5)
def embed_task(cfg: PipelineConfig) -> stages.StageOutput:
    """Extract embeddings, reporting progress as a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, key="embed-progress", description="images embedded")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    out = stages.run_embed(cfg, progress=progress)
    update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    m = out.metrics
    create_table_artifact(
        key="embed-summary",
        table=[{"images": m["n_images"], "valid": m["n_valid"], "dim": m["dim"], "skipped": len(m["skipped"]),
                "seconds": m["seconds"], "store": out.artifact}],
        description="Teacher embeddings",
    )
    return out


def embed(cfg: PipelineConfig) -> stages.StageOutput:
    plan = stages.plan_embed(cfg)
    return cached_call(embed_task, plan.key, store.is_complete(plan.dir), cfg)

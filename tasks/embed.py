"""Task: teacher embeddings of every image (stage 0)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from alignet_core.config import PipelineConfig
from alignet_core.embed.stage import EmbedOutput, plan_embed, run_embed
from alignet_core.pipeline.report import embed_rows
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output


@task(name="embed", cache_policy=StageCache(locate=stage_output(plan_embed, EmbedOutput)),
      persist_result=True, result_serializer=RESULT_SERIALIZER, retries=1, retry_delay_seconds=5)
def embed(cfg: PipelineConfig) -> EmbedOutput:
    """Extract embeddings, reporting progress as a Prefect progress artifact."""
    artifact_id = create_progress_artifact(progress=0.0, key="embed-progress", description="images embedded")

    def progress(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))

    out = run_embed(cfg, progress=progress)
    update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    create_table_artifact(key="embed-summary", table=embed_rows(out), description="Teacher embeddings")
    return out

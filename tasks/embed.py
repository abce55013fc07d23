"""Task: teacher embeddings of every image (stage 0)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from alignet_core.context import RunContext
from alignet_core.embed.render import embed_rows
from alignet_core.embed.stage import EmbedOutput, check_skipped, plan_embed, run_embed
from alignet_core.runtime.progress import ProgressLog
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output
from tasks._progress import progress_artifact


@task(name="embed", cache_policy=StageCache(locate=stage_output(plan_embed, EmbedOutput)),
      persist_result=True, result_serializer=RESULT_SERIALIZER, retries=1, retry_delay_seconds=5)
def embed(ctx: RunContext) -> EmbedOutput:
    """Extract embeddings, reporting progress (count, rate, time left) as a Prefect progress artifact."""
    lines = ProgressLog("embed", "images", 0)
    with progress_artifact("embed-progress", "embed"):
        out = run_embed(ctx, progress=lambda done, total: lines.update(done, total=total))
    create_table_artifact(key="embed-summary", table=embed_rows(out), description="Teacher embeddings")
    if out.metrics.skipped:
        create_table_artifact(
            key="embed-skipped", table=[s.model_dump() for s in out.metrics.skipped[:1000]],
            description=f"{len(out.metrics.skipped)} images skipped (could not be read or decoded; their rows are "
                        "invalid and no later stage uses them); the first 1,000")
    return out


def embedded(ctx: RunContext) -> EmbedOutput:
    """The embed task's output, refused (`InputError`, the run fails) when more than
    `embed.max_skipped_fraction` of the images were skipped: checked here, in the flow, because a cache
    hit returns the task's output without running its body."""
    out = embed(ctx)
    check_skipped(out.metrics, ctx.cfg.embed.max_skipped_fraction)
    return out

"""Task: teacher embeddings of every image (stage 0)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from alignet_core.context import RunContext
from alignet_core.embed.render import change_rows, embed_rows
from alignet_core.embed.stage import EmbedOutput, check_skipped, embed_plan, run_embed
from alignet_core.io import store
from alignet_core.runtime.progress import ProgressLog
from alignet_core.runtime.runner import reuse
from tasks._cache import RESULT_SERIALIZER, Located, StageCache
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


def _located(ctx: RunContext) -> Located:
    """The embed stage's output: keyed by the run's one plan, which covers the source's listing."""
    p = embed_plan(ctx)
    return Located(key=p.key, dir=p.dir, complete=store.is_complete(p.dir), expected=lambda: reuse(p, EmbedOutput))


@task(name="embed", cache_policy=StageCache(locate=_located),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def embed(ctx: RunContext) -> EmbedOutput:
    """Extract embeddings, reporting progress (count, rate, time left) as a Prefect progress artifact."""
    lines = ProgressLog("embed", "images", 0)
    with progress_artifact("embed-progress", "embed"):
        out = run_embed(ctx, progress=lambda done, total: lines.update(done, total=total))
    create_table_artifact(key="embed-summary", table=embed_rows(out), description="Teacher embeddings")
    if out.metrics.changes is not None:
        create_table_artifact(key="embed-changes", table=change_rows(out.metrics.changes),
                              description="What changed in the source since the previous store (added, changed, "
                                          "removed images; rows reused)")
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

"""Task: fit the human-aligned teacher transform and apply it (stage 1)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core.context import RunContext
from alignet_core.embed.stage import EmbedOutput
from alignet_core.transform.render import transform_markdown
from alignet_core.transform.stage import TransformOutput, plan_transform, run_transform
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


@task(name="fit-transform", cache_policy=StageCache(locate=stage_output(plan_transform, TransformOutput)),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def fit_transform(ctx: RunContext, emb: EmbedOutput) -> TransformOutput:
    with progress_artifact("transform-progress", "transform fit", "transform apply"):
        out = run_transform(ctx, emb)
    if out.metrics.enabled:
        create_markdown_artifact(key="transform-accuracy", markdown=transform_markdown(out),
                                 description="Teacher odd-one-out accuracy before and after the transform, "
                                 "local structure kept, hyper-parameters")
    return out

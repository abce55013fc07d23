"""Task: alignment of the teacher and the student at every level, with intervals (stage 5)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core.context import RunContext
from alignet_core.evaluate.render import alignment_markdown, saliency_markdown
from alignet_core.evaluate.stage import EvaluateOutput, plan_evaluate, run_evaluate
from alignet_core.runtime.runner import StageOutput
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


@task(name="evaluate", cache_policy=StageCache(locate=stage_output(plan_evaluate, EvaluateOutput)),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def evaluate(ctx: RunContext, emb: StageOutput, tfm: StageOutput, student: StageOutput | None) -> EvaluateOutput:
    with progress_artifact("evaluate-progress", "evaluate embed", "evaluate score"):
        out = run_evaluate(ctx, emb, tfm, student)
    create_markdown_artifact(key="alignment-levels", markdown=alignment_markdown(out),
                             description="Alignment at each level of abstraction, before and after, with 95% intervals")
    if out.metrics.saliency is not None:
        create_markdown_artifact(key="saliency-alignment", markdown=saliency_markdown(out),
                                 description="Where the student looks: saliency vs importance maps, before and after")
    return out

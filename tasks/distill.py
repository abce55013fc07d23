"""Task: finetune the student on official-format triplets and evaluate it (stage 4)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core.context import RunContext
from alignet_core.distill.render import student_markdown
from alignet_core.distill.stage import DistillOutput, distill_files, plan_distill, run_distill
from alignet_core.io import store
from alignet_core.runtime.progress import ProgressLog
from alignet_core.runtime.runner import reuse
from alignet_core.sample.stage import SampleOutput
from tasks._cache import RESULT_SERIALIZER, Located, StageCache
from tasks._progress import progress_artifact
from tasks._retry import retry_unless_user_error


def _locate(ctx: RunContext, ds: SampleOutput | None) -> Located:
    """Stage 4's output: trained on `ds`, or on `distill.dataset` when set."""
    plan = ctx.plan(plan_distill, distill_files(ctx.cfg, ds))
    return Located(key=plan.key, dir=plan.dir, complete=store.is_complete(plan.dir),
                   expected=lambda: reuse(plan, DistillOutput))


@task(name="distill", cache_policy=StageCache(locate=_locate),
      persist_result=True, result_serializer=RESULT_SERIALIZER,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def distill(ctx: RunContext, ds: SampleOutput | None) -> DistillOutput:
    """Train the student with a progress artifact; publish its accuracy and loss curve. With several
    `distill.devices` the library starts torchrun's ranks as a child process and reports their steps here."""
    steps = ProgressLog("distill", "steps", ctx.cfg.distill.steps)
    with progress_artifact("distill-progress", "distill"):
        out = run_distill(ctx, ds, lambda step, loss: steps.update(step))
    create_markdown_artifact(key="student-accuracy", markdown=student_markdown(out),
                             description="Student accuracy before and after distillation, and its loss curve")
    return out

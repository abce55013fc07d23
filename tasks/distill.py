"""Task: finetune the student on the published triplets and evaluate it (stage 4)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from alignet_core import stages, store
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


@task(name="distill", persist_result=True, retries=1, retry_delay_seconds=5)
def distill_task(cfg: PipelineConfig, ds: stages.StageOutput) -> stages.StageOutput:
    out = stages.run_distill(cfg, ds)
    m = out.metrics
    create_table_artifact(
        key="student-accuracy",
        table=[{"sampling": s, "before": round(m["acc_before"][s], 4), "after": round(m["acc_after"][s], 4)}
               for s in m["acc_after"]],
        description=f"Student triplet accuracy vs the teacher on held-out triplets ({m['steps']} steps)",
    )
    return out


def distill(cfg: PipelineConfig, ds: stages.StageOutput) -> stages.StageOutput:
    plan = stages.plan_distill(cfg, ds)
    return cached_call(distill_task, plan.key, store.is_complete(plan.dir), cfg, ds)

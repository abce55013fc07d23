"""Task: fit the human-aligned teacher transform and apply it (stage 1)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from alignet_core import stages, store
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


@task(name="fit-transform", persist_result=True, retries=1, retry_delay_seconds=5)
def transform_task(cfg: PipelineConfig, emb: stages.StageOutput) -> stages.StageOutput:
    out = stages.run_transform(cfg, emb)
    m = out.metrics
    if m.get("enabled"):
        create_table_artifact(
            key="transform-accuracy",
            table=[{"human data": m["human_data"], "held-out triplets": m["n_heldout"],
                    "accuracy before": round(m["acc_before"], 4), "accuracy after": round(m["acc_after"], 4),
                    "best epoch": m["best_epoch"], "seconds": m["seconds"]}],
            description="Teacher odd-one-out accuracy on held-out triplets, before and after the transform",
        )
    return out


def fit_transform(cfg: PipelineConfig, emb: stages.StageOutput) -> stages.StageOutput:
    plan = stages.plan_transform(cfg, emb)
    return cached_call(transform_task, plan.key, store.is_complete(plan.dir), cfg, emb)

"""The evaluate stage's declaration for the registry (data: no stage code is imported here)."""

from __future__ import annotations

from alignet_core.config import PipelineConfig
from alignet_core.runtime.declaration import Stage


def _runs(cfg: PipelineConfig) -> bool:
    return cfg.evaluate.enabled


def _needs(cfg: PipelineConfig, name: str) -> bool:
    """A given student (`evaluate.student`) replaces the pipeline's own: no distillation is needed."""
    return name != "distill" or cfg.evaluate.student is None


STAGE = Stage(
    name="evaluate", summary="alignment at every level, before and after, with 95% intervals",
    section="evaluate", inputs=("embed", "transform", "distill"), run="alignet_core.evaluate.stage:run_evaluate",
    output="alignet_core.evaluate.stage:EvaluateOutput", deployment="alignment-levels",
    check="alignet_core.evaluate.checks:check",
    example="--set evaluate.student=runs/student", runs=_runs, needs=_needs,
    report="alignet_core.evaluate.render:report_markdown", figures="alignet_core.evaluate.render:saliency_figures",
)

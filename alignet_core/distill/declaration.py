"""The distill stage's declaration for the registry (data: stage code is imported only when used)."""

from __future__ import annotations

from alignet_core.config import PipelineConfig
from alignet_core.runtime.declaration import Stage


def _runs(cfg: PipelineConfig) -> bool:
    from alignet_core.distill.stage import distill_runs

    return distill_runs(cfg)


def _needs(cfg: PipelineConfig, name: str) -> bool:
    """A given dataset (`distill.dataset`) replaces the pipeline's own: no sampling is needed."""
    return cfg.distill.dataset is None


STAGE = Stage(
    name="distill", summary="finetune the student with the AligNet loss", section="distill",
    inputs=("sample",), run="alignet_core.distill.stage:run_distill",
    output="alignet_core.distill.stage:DistillOutput", deployment="distill-student",
    check="alignet_core.distill.checks:check",
    example="--set distill.steps=2000", runs=_runs, needs=_needs,
    figures="alignet_core.distill.render:student_figures",
)

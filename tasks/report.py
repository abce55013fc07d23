"""Task: the run's report (markdown) and summary.json, also published as a Prefect artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig


@task(name="report", cache_policy=NO_CACHE)
def report(cfg: PipelineConfig, outs: dict[str, stages.StageOutput]) -> dict[str, Any]:
    summary = stages.write_report(cfg, outs)
    create_markdown_artifact(key="alignet-report", markdown=summary.pop("report_markdown"),
                             description="AligNet pipeline report")
    return summary

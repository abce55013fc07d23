"""Task: the run's report (markdown) and summary.json, also published as a Prefect artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from alignet_core.config import PipelineConfig
from alignet_core.pipeline.report import RunOutputs, RunSummary, run_markdown, write_report


@task(name="report", cache_policy=NO_CACHE)
def report(cfg: PipelineConfig, outs: RunOutputs) -> RunSummary:
    summary = write_report(cfg, outs)
    create_markdown_artifact(key="alignet-report", markdown=run_markdown(summary), description="AligNet pipeline report")
    return summary

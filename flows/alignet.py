"""The end-to-end AligNet flow: every stage the config runs, in the registry's order, then the report."""

from __future__ import annotations

from prefect import flow

from alignet_core.pipeline.report import RunOutputs, RunSummary
from flows._config import Overrides, resolve_context
from flows.stages import compute
from tasks.report import report


@flow(name="alignet")
def alignet(config_path: str | None = None, overrides: Overrides | None = None) -> RunSummary:
    """Run every stage (each cached on its content key) and return the run's summary."""
    ctx = resolve_context(config_path, overrides)
    return report(ctx.cfg, RunOutputs(**compute(ctx)))


if __name__ == "__main__":
    alignet()

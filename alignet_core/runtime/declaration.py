"""`Stage`: what a stage package declares about itself, once, for the registry to assemble.

A declaration is data: the stage's name, the stages whose outputs it reads, when a run computes it,
which inputs a config needs, its config section, its deployment and CLI example, and where its code
is (`"module:attribute"` references: how it runs, its output type, its report section and figures).
The code is imported when it is used, so reading the registry (the CLI's help, `alignet validate`)
imports no stage. The end-to-end flow, the per-stage flows, the CLI's stage commands, the deployments
and the run summary are all derived from `alignet_core.pipeline.registry.STAGES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignet_core.config import PipelineConfig
    from alignet_core.runtime.render import Figure
    from alignet_core.runtime.runner import StageOutput


def _always(cfg: PipelineConfig) -> bool:
    return True


def _every_input(cfg: PipelineConfig, name: str) -> bool:
    return True


def load(ref: str) -> Any:
    """The object a `"package.module:attribute"` reference names (the module imported now)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as its package declares it.

    name: the stage's name (its output folder `<root>/stages/<name>/`, its CLI command, its flow).
    summary: what it makes, in a few words (CLI help, deployment description).
    section: the config section it is configured by.
    inputs: the stages whose outputs it reads, in the order its `run` takes them.
    run: where `run(cfg, *inputs) -> output` is (an input it does not need under `cfg` is None).
    output: where its output type (a `StageOutput` subclass) is.
    deployment: the name of its Prefect deployment (`<name>/<deployment>`).
    example: the `--set` overrides of its CLI example.
    runs: whether an end-to-end run computes it under `cfg`.
    needs: whether, under `cfg`, it reads input `name` (e.g. distillation on a given dataset needs no
        sampling).
    check: where its checks before any work are (`check(ctx)`, raising `ConfigError` / `InputError` naming
        the field); `pipeline.preflight` runs every stage's, in order, for every run.
    report: where its own section of the run's `report.md` is rendered (`section(output) -> str`), if any.
    figures: where the charts of its output for the run's report are made (`figures(output) -> list`), if any.
    """

    name: str
    summary: str
    section: str
    inputs: tuple[str, ...]
    run: str
    output: str
    deployment: str
    example: str
    runs: Callable[[PipelineConfig], bool] = _always
    needs: Callable[[PipelineConfig, str], bool] = _every_input
    check: str | None = None
    report: str | None = None
    figures: str | None = None

    def preflight(self, ctx: Any) -> None:
        """Run this stage's checks on `ctx`, the run context (none when it declares none)."""
        if self.check is not None:
            load(self.check)(ctx)

    def output_type(self) -> type[StageOutput]:
        return load(self.output)

    def report_section(self, out: StageOutput) -> str | None:
        """This stage's section of `report.md` for `out`, or None."""
        return None if self.report is None else load(self.report)(out)

    def report_figures(self, out: StageOutput) -> list[Figure]:
        """This stage's charts of `out` for the run's report (none when it declares none)."""
        return [] if self.figures is None else load(self.figures)(out)

    def compute(self, cfg: PipelineConfig, *inputs: StageOutput | None) -> StageOutput:
        """Run the stage without Prefect (its output reused when complete, as in a flow)."""
        return load(self.run)(cfg, *inputs)

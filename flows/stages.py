"""The pipeline's flows, derived from the stage registry (`alignet_core.pipeline.registry.STAGES`).

`compute` runs the stages a config asks for, in the registry's order, each through its Prefect step
(a task cached on the stage's content key; the sampling stage's step is a subflow on Dask). One flow
per stage, `<stage>_flow` (the deployments' entrypoints `flows/stages.py:<stage>_flow`), computes that
stage and the inputs it needs; `flows.alignet.alignet` computes every stage that runs and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow, flow

from alignet_core.context import RunContext
from alignet_core.pipeline import registry
from alignet_core.pipeline.preflight import check_inputs
from alignet_core.runtime.declaration import Stage
from alignet_core.runtime.runner import StageOutput
from flows._config import Overrides, resolve_context
from flows.sample import sample_on_dask
from tasks.cluster import cluster
from tasks.distill import distill
from tasks.embed import embedded
from tasks.evaluate import evaluate
from tasks.transform import fit_transform

#: each stage's Prefect step, `step(ctx, *inputs)` with the inputs in its declaration's order (by name:
#: the order of the stages is the registry's alone)
STEPS: dict[str, Callable[..., Any]] = {"cluster": cluster, "distill": distill, "embed": embedded, "evaluate": evaluate,
                                        "sample": sample_on_dask, "transform": fit_transform}


def compute(ctx: RunContext, target: str | None = None) -> dict[str, StageOutput | None]:
    """The outputs of the stages `registry.to_compute(ctx.cfg, target)` names, each computed (or reused) by
    its step from the run context and the outputs of its inputs (None for an input the config does not need)."""
    outs: dict[str, StageOutput | None] = {}
    for s in registry.to_compute(ctx.cfg, target):
        check_inputs(ctx, s.name, [outs.get(i) for i in s.inputs])  # the stores it reads hold the listed images
        outs[s.name] = STEPS[s.name](ctx, *(outs.get(i) for i in s.inputs))
    return outs


def _stage_flow(s: Stage) -> Flow[..., StageOutput]:
    """The flow of stage `s` alone: its inputs come from the cache or are computed first."""

    def stage_flow(config_path: str | None = None, overrides: Overrides | None = None) -> StageOutput:
        out = compute(resolve_context(config_path, overrides), s.name)[s.name]
        assert out is not None  # a target is always computed
        return out

    stage_flow.__name__ = stage_flow.__qualname__ = f"{s.name}_flow"
    stage_flow.__doc__ = (f"Stage {registry.number(s.name)}, {s.name}: {s.summary}; the stages it needs come from "
                          "the cache or are computed first.")
    return flow(name=s.name)(stage_flow)


#: one flow per stage, by stage name; each is also this module's `<stage>_flow` (deployment entrypoints)
FLOWS: dict[str, Flow[..., StageOutput]] = {s.name: _stage_flow(s) for s in registry.STAGES}
globals().update({f"{name}_flow": f for name, f in FLOWS.items()})

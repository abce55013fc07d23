"""The stage registry: the pipeline's stages in their order, declared here and nowhere else.

Each stage package declares itself (`<stage>/declaration.py`: a `runtime.declaration.Stage`); this
module puts the declarations in order. The end-to-end flow, the per-stage flows and deployments, the
CLI's stage commands and the run summary are derived from `STAGES`. Adding a stage is one package
(its `stage.py`, `render.py` and `declaration.py`), its thin Prefect task, and one line below.
"""

from __future__ import annotations

from alignet_core.cluster.declaration import STAGE as CLUSTER
from alignet_core.config import PipelineConfig
from alignet_core.distill.declaration import STAGE as DISTILL
from alignet_core.embed.declaration import STAGE as EMBED
from alignet_core.evaluate.declaration import STAGE as EVALUATE
from alignet_core.runtime.declaration import Stage
from alignet_core.sample.declaration import STAGE as SAMPLE
from alignet_core.transform.declaration import STAGE as TRANSFORM

#: the pipeline, in order: every stage after the stages it reads
STAGES: tuple[Stage, ...] = (EMBED, TRANSFORM, CLUSTER, SAMPLE, DISTILL, EVALUATE)


def stage(name: str) -> Stage:
    """The declaration of the stage `name` (`KeyError` naming the stages when there is none)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {names()}")


def names() -> list[str]:
    """The stages' names, in order."""
    return [s.name for s in STAGES]


def number(name: str) -> int:
    """A stage's place in the pipeline, 0 for the first."""
    return names().index(name)


def to_compute(cfg: PipelineConfig, target: str | None = None) -> list[Stage]:
    """The stages a run computes, in order: every stage that `runs` under `cfg` (target None: the
    end-to-end run), or `target` alone; then, transitively, the inputs they need under `cfg` that run
    under it (a disabled input is handed on as None)."""
    wanted = {stage(target).name} if target is not None else {s.name for s in STAGES if s.runs(cfg)}
    for s in reversed(STAGES):
        if s.name in wanted:
            wanted |= {i for i in s.inputs if s.needs(cfg, i) and stage(i).runs(cfg)}
    return [s for s in STAGES if s.name in wanted]


def check_order() -> None:
    """`ValueError` unless every stage's inputs are stages declared before it and names are unique."""
    seen: set[str] = set()
    for s in STAGES:
        if s.name in seen:
            raise ValueError(f"stage {s.name!r} is declared twice")
        if missing := [i for i in s.inputs if i not in seen]:
            raise ValueError(f"stage {s.name!r} reads {missing}, which are not declared before it")
        seen.add(s.name)

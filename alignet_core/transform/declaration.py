"""The transform stage's declaration for the registry (data: no stage code is imported here)."""

from __future__ import annotations

from alignet_core.runtime.declaration import Stage

STAGE = Stage(
    name="transform", summary="the human-aligned transform of the teacher", section="transform",
    inputs=("embed",), run="alignet_core.transform.stage:run_transform",
    output="alignet_core.transform.stage:TransformOutput", deployment="human-alignment-transform",
    check="alignet_core.transform.checks:check",
    example="--set transform.epochs=30", figures="alignet_core.transform.render:transform_figures",
)

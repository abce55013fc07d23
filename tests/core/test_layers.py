"""The package's layers: stages never import each other; the shared science (stats, human, models, io)
and the stage runtime import no stage and not the pipeline above them."""

from __future__ import annotations

from alignet_core.pipeline import registry
from alignet_core.runtime.code_version import import_graph

STAGES = set(registry.names())
SHARED = {"stats", "human", "models", "io", "runtime"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _arrows() -> list[tuple[str, str]]:
    return [(m, i) for m, imports in import_graph().items() for i in imports]


def test_no_stage_imports_another_stage() -> None:
    wrong = sorted((m, i) for m, i in _arrows()
                   if _package(m) in STAGES and _package(i) in STAGES and _package(i) != _package(m))
    assert not wrong, f"stages import each other: {wrong}"


def test_the_shared_layers_import_no_stage_and_not_the_pipeline() -> None:
    wrong = sorted((m, i) for m, i in _arrows() if _package(m) in SHARED and _package(i) in STAGES | {"pipeline"})
    assert not wrong, f"shared code imports a stage or the pipeline: {wrong}"


def test_the_layer_check_sees_a_real_import() -> None:
    graph = import_graph()
    assert "alignet_core.stats.metrics" in graph["alignet_core.cluster.stage"]
    assert "alignet_core.runtime.runner" in graph["alignet_core.transform.stage"]

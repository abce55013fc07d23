"""The package's layers: every import points down (or stays inside its package), and the stages, one
layer, never import each other. What each layer may use is written here once."""

from __future__ import annotations

from alignet_core.pipeline import registry
from alignet_core.runtime.code_version import import_graph

#: the layers from the ground up; a module may import its own package and any package of a lower layer
LAYERS: list[set[str]] = [
    {"errors", "records", "plots"},
    {"io", "stats", "synthetic"},
    {"config"},
    {"runtime", "hardware"},
    {"human", "models"},
    {"context"},
    set(registry.names()),
    {"pipeline"},
]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def _arrows() -> list[tuple[str, str]]:
    return [(m, i) for m, imports in import_graph().items() for i in imports if _package(m) and _package(i)]


def test_every_package_has_a_layer() -> None:
    packages = {_package(m) for m in import_graph()} - {""}
    assert packages == set().union(*LAYERS), packages ^ set().union(*LAYERS)


def test_no_import_points_up_or_sideways() -> None:
    wrong = sorted((m, i) for m, i in _arrows()
                   if _package(m) != _package(i) and _layer(_package(m)) <= _layer(_package(i)))
    assert not wrong, f"imports that point up, or between packages of one layer (stages): {wrong}"


def test_the_layer_check_sees_real_imports() -> None:
    graph = import_graph()
    assert "alignet_core.stats.metrics" in graph["alignet_core.cluster.stage"]
    assert "alignet_core.runtime.runner" in graph["alignet_core.transform.stage"]
    assert _layer("transform") == _layer("distill") > _layer("human") > _layer("config") > _layer("io")

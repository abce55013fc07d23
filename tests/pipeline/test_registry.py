"""The stage registry: the order declared once, and everything that runs stages derived from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from alignet_core.config import parse_config
from alignet_core.pipeline import registry
from alignet_core.runtime.declaration import load

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_reads_only_stages_declared_before_it() -> None:
    registry.check_order()
    assert registry.names() == ["embed", "transform", "cluster", "sample", "distill", "evaluate"]


def test_each_declaration_names_real_code() -> None:
    from alignet_core.runtime.runner import StageOutput

    for s in registry.STAGES:
        assert issubclass(s.output_type(), StageOutput), s.name
        for ref in filter(None, (s.run, s.report, s.figures)):
            assert callable(load(ref)), ref


def _order_literals(tree: ast.AST) -> list[int]:
    """Line numbers of literal collections (or call arguments) that name four or more stages, in the
    registry's order (a stage's own inputs, at most three, are not a copy of the order)."""
    stages = registry.names()
    hits = []
    fields = {ast.Tuple: "elts", ast.List: "elts", ast.Set: "elts", ast.Dict: "keys", ast.Call: "args"}
    for node in ast.walk(tree):
        field = fields.get(type(node))
        if field is None:
            continue
        named = [e.value for e in getattr(node, field) if isinstance(e, ast.Constant) and e.value in stages]
        if len(named) >= 4 and named == sorted(named, key=stages.index):
            hits.append(node.lineno)
    return hits


def test_the_stage_order_is_written_in_the_registry_alone() -> None:
    """No module of the library, the tasks or the flows lists three or more stages in pipeline order
    except the registry (a flow, CLI or report that did would have its own copy of the order)."""
    found = {}
    for folder in ("alignet_core", "flows", "tasks"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "registry.py" and path.parent.name == "pipeline":
                continue
            if lines := _order_literals(ast.parse(path.read_text())):
                found[str(path.relative_to(REPO))] = lines
    assert not found, f"the stage order is written out here too: {found}"


def test_the_order_check_finds_a_copy() -> None:
    assert _order_literals(ast.parse('X = ("embed", "transform", "cluster", "sample")')) == [1]
    assert _order_literals(ast.parse('f(1, "embed", "cluster", "sample", "evaluate")')) == [1]
    assert _order_literals(ast.parse('inputs = ("embed", "transform", "distill")')) == []
    assert _order_literals(ast.parse('X = {"cluster": 1, "embed": 2, "transform": 3}')) == []


def test_a_run_computes_what_the_config_asks_and_the_inputs_those_need() -> None:
    cfg = parse_config({})
    assert [s.name for s in registry.to_compute(cfg)] == registry.names()
    assert [s.name for s in registry.to_compute(cfg, "cluster")] == ["embed", "transform", "cluster"]
    given = parse_config({"distill": {"dataset": "/data/ds"}})
    assert [s.name for s in registry.to_compute(given, "distill")] == ["distill"]
    off = parse_config({"distill": {"enabled": False}, "evaluate": {"enabled": False}})
    assert [s.name for s in registry.to_compute(off)] == ["embed", "transform", "cluster", "sample"]
    student = parse_config({"evaluate": {"student": "/runs/student"}})
    assert [s.name for s in registry.to_compute(student, "evaluate")] == ["embed", "transform", "evaluate"]
    assert [s.name for s in registry.to_compute(off, "evaluate")] == ["embed", "transform", "evaluate"]
    with pytest.raises(KeyError, match="the stages are"):
        registry.to_compute(cfg, "nope")


def test_flows_and_steps_are_derived_from_the_registry() -> None:
    import flows.stages as fs

    assert set(fs.STEPS) == set(registry.names())
    for name in registry.names():
        f = getattr(fs, f"{name}_flow")
        assert f is fs.FLOWS[name] and f.name == name
        assert f"Stage {registry.number(name)}, {name}" in f.description


def test_the_deployments_match_the_registry() -> None:
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    expected = {s.deployment: f"flows/stages.py:{s.name}_flow" for s in registry.STAGES}
    expected["regenerate-dataset"] = "flows/alignet.py:alignet"
    assert {name: d["entrypoint"] for name, d in deps.items()} == expected
    for s in registry.STAGES:
        assert deps[s.deployment]["description"].startswith(f"Stage {registry.number(s.name)}: "), s.name


def test_the_cli_has_one_command_per_stage_in_order() -> None:
    from flows.cli import _build_parser

    sub = next(a for a in _build_parser()._actions if a.dest == "command")
    commands = list(sub.choices)
    stage_commands = [c for c in commands if c in registry.names()]
    assert stage_commands == registry.names()
    for s in registry.STAGES:
        assert sub.choices[s.name].epilog.strip().endswith(f"alignet {s.name} -c my.yaml {s.example}")

"""Stage keys cover exactly the code that computes the stage: every `alignet_core` module in the
stage's import closure and the numeric libraries it imports, computed from the import graph."""

from __future__ import annotations

import graphlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignet_core.pipeline import registry
from alignet_core.runtime.code_version import (
    NUMERIC_LIBRARIES,
    code_version,
    import_closure,
    import_graph,
    installed_version,
    module_files,
    package_dir,
)

STAGES = tuple(registry.names())


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's Python sources, copied so that tests may edit them."""
    root = tmp_path_factory.mktemp("src") / "alignet_core"
    for path in package_dir().rglob("*.py"):
        dest = root / path.relative_to(package_dir())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return root


def test_an_edit_changes_the_keys_of_exactly_the_stages_whose_closure_holds_the_module(package_copy: Path) -> None:
    stage_modules = [f"alignet_core.{s}.stage" for s in STAGES]
    closures = {m: set(import_closure(m, package_copy).modules) for m in stage_modules}
    base = {m: code_version(m, package_copy) for m in stage_modules}
    files = module_files(package_copy)
    assert len(files) > 30
    for name, path in files.items():
        original = path.read_bytes()
        path.write_bytes(original + b"\n_AN_EDIT = 1\n")
        try:
            for m in stage_modules:
                changed = code_version(m, package_copy) != base[m]
                assert changed == (name in closures[m]), (m, name)
        finally:
            path.write_bytes(original)
    assert {m: code_version(m, package_copy) for m in stage_modules} == base


def test_text_edits_change_no_key_and_code_edits_do(package_copy: Path) -> None:
    """Docstrings, comments, layout and config field descriptions are not code: editing them keeps
    every stage's key; an edit of what the code does changes it."""
    stage_modules = [f"alignet_core.{s}.stage" for s in STAGES]
    base = {m: code_version(m, package_copy) for m in stage_modules}
    runner = package_copy / "runtime" / "runner.py"  # in every stage's closure
    config = package_copy / "config" / "embed.py"
    original = {p: p.read_text() for p in (runner, config)}
    text = original[runner]
    assert '"""The stage runner' in text and 'description="' in original[config]
    edits = [
        (runner, text.replace('"""The stage runner', '"""An edited docstring.\n\nThe stage runner', 1)),
        (runner, text.replace("\ndef ", "\n# an added comment\n\n\ndef ", 1)),
        (runner, text.replace("    Disk-full errors", "    An edited function docstring. Disk-full errors", 1)),
        (config, original[config].replace('description="', 'description="Edited: ', 1)),
    ]
    try:
        for path, edited in edits:
            assert edited != original[path]
            path.write_text(edited)
            assert {m: code_version(m, package_copy) for m in stage_modules} == base, edited[:200]
            path.write_text(original[path])
        runner.write_text(text.replace("return work()", "return work()  # same\n    return None", 1))
        assert all(code_version(m, package_copy) != base[m] for m in stage_modules)
    finally:
        for path, content in original.items():
            path.write_text(content)


def test_the_closure_holds_every_module_a_stage_loads_when_imported() -> None:
    """Independent of the static reading: what Python actually imports is inside the closure."""
    for stage in STAGES:
        module = f"alignet_core.{stage}.stage"
        code = (f"import sys, json, {module}; "
                "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'alignet_core')))")
        loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout))
        closure = set(import_closure(module).modules)
        assert module in loaded and loaded <= closure, (stage, loaded - closure)


def test_the_modules_the_hand_kept_lists_missed_are_now_covered() -> None:
    """The lists this replaced left out the runner, `hardware` (autocast dtype), cluster's row
    reader and distillation's sources, metrics and human data."""
    closure = {s: set(import_closure(f"alignet_core.{s}.stage").modules) for s in STAGES}
    for s in STAGES:
        assert {"alignet_core.runtime.runner", "alignet_core.runtime.code_version", "alignet_core.config",
                "alignet_core.io.store"} <= closure[s], s
    assert "alignet_core.hardware" in closure["embed"] and "alignet_core.hardware" in closure["transform"]
    assert "alignet_core.io.embedding_store" in closure["cluster"]  # gather_rows, once in the teacher module
    assert {"alignet_core.io.sources", "alignet_core.stats.metrics", "alignet_core.human.triplets",
            "alignet_core.human.data"} <= closure["distill"]
    assert not any(m.startswith(("alignet_core.sample", "alignet_core.distill")) for m in closure["transform"])
    # a stage takes its inputs as plain outputs: no stage imports another stage's stage.py
    for s in STAGES:
        assert [m for m in closure[s] if m.endswith(".stage")] == [f"alignet_core.{s}.stage"], s


@pytest.mark.parametrize("library", ["torch", "faiss", "numpy", "zarr", "timm"])
def test_a_library_upgrade_changes_the_keys_that_depend_on_it(library: str) -> None:
    def upgraded(lib: str) -> str:
        return "9.9.9" if lib == library else installed_version(lib)

    for stage in STAGES:
        module = f"alignet_core.{stage}.stage"
        depends = library in import_closure(module).libraries
        assert (code_version(module, library_version=upgraded) != code_version(module)) == depends, stage


def test_the_numeric_libraries_each_stage_computes_with_are_in_its_key() -> None:
    assert {"torch", "timm", "numpy", "zarr"} <= set(import_closure("alignet_core.embed.stage").libraries)
    assert {"faiss", "numpy", "zarr"} <= set(import_closure("alignet_core.cluster.stage").libraries)
    assert {"torch", "numpy", "zarr"} <= set(import_closure("alignet_core.sample.stage").libraries)


def test_library_versions_are_read_from_the_installed_distributions() -> None:
    assert installed_version("torch").startswith("torch==")
    assert installed_version("faiss").startswith("faiss")  # faiss-cpu here, faiss-gpu-* elsewhere
    assert installed_version("no_such_library") == "absent"
    assert set(NUMERIC_LIBRARIES) >= {"torch", "timm", "faiss", "numpy", "zarr"}


def test_the_package_has_no_import_cycle() -> None:
    """Every import counts, those inside functions too; a package's own `__init__` is left out (its
    submodules import it by construction)."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in import_graph().items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_a_relative_import_and_a_lazy_import_count(tmp_path: Path) -> None:
    root = tmp_path / "alignet_core"
    (root / "pkg").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "a.py").write_text("from . import b\n")
    (root / "pkg" / "b.py").write_text("def f():\n    from alignet_core.pkg import c\n    import torch\n")
    (root / "pkg" / "c.py").write_text("import numpy\n")
    (root / "pkg" / "d.py").write_text("")
    closure = import_closure("alignet_core.pkg.a", root)
    assert closure.modules == ("alignet_core", "alignet_core.pkg", "alignet_core.pkg.a", "alignet_core.pkg.b",
                               "alignet_core.pkg.c")
    assert closure.libraries == ("numpy", "torch")

"""benchmarks/reproducibility.py: the cross-kernel change of the published dataset is measured and reported
(docs/reproducibility.md, promises 1 and 4).

The slow test runs the benchmark for real on two variants (three small pipelines, ~2 minutes on 2 cores);
the stored result is checked for what the doc states from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import reproducibility
from benchmarks._machine import RESULTS


def _check_statistically_the_same(name: str, c: dict) -> None:
    """What promise 4 keeps across kernels: the same files and row counts; the same triplets wherever the
    groups are the same (class strategies always, cluster strategies when no assignment changed)."""
    for fname, f in c["dataset"].items():
        assert f["rows"][0] == f["rows"][1], (name, fname)
        if "between_class" in fname or c["clusters"]["rows_changed"] == 0:
            assert f["triplets_only_in_baseline"] == f["triplets_only_in_variant"] == 0, (name, fname)
        assert 0 <= f["changed_fraction"] <= 1 and f["label_flips"] <= f["rows"][0]


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(SystemExit) as err:
        reproducibility.main(["--variants", "baseline_again,avx9000"])
    assert err.value.code == 2


def test_the_stored_result_reports_every_variant_with_its_machine() -> None:
    r = json.loads((RESULTS / "reproducibility.json").read_text())
    assert r["benchmark"] == "reproducibility" and r["machine"]["cpu_model"] and r["machine"]["cores"]
    assert set(r["against_baseline"]) == set(reproducibility.DEFAULT_VARIANTS)
    assert r["variants"]["baseline"]["torch_cpu_capability"] and r["variants"]["aten_default"]["torch_cpu_capability"] == "DEFAULT"
    again = r["against_baseline"]["baseline_again"]
    assert again["dataset_summary"]["files_identical"] == again["dataset_summary"]["files"] == 4  # promise 1
    assert all(again[s]["identical"] for s in ("embeddings", "transformed", "clusters"))
    for name, c in r["against_baseline"].items():
        _check_statistically_the_same(name, c)
        assert r["summary"][name] == c["dataset_summary"]


@pytest.mark.slow
def test_benchmark_measures_a_rerun_and_another_kernel(tmp_path: Path) -> None:
    result = reproducibility.main(["--variants", "baseline_again,aten_default", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "reproducibility.json").read_text())["benchmark"] == "reproducibility"
    again, other = result["against_baseline"]["baseline_again"], result["against_baseline"]["aten_default"]
    assert again["dataset_summary"]["files_identical"] == 4  # promise 1: another process, the same bytes
    assert result["variants"]["aten_default"]["torch_cpu_capability"] == "DEFAULT"
    _check_statistically_the_same("aten_default", other)
    assert set(other["dataset_summary"]) >= {"files_identical", "rows", "label_flips", "changed_fraction"}

"""One run context per run: the config parsed and preflighted once, the image source listed once, the
human data read and split once, and each stage planned once (Prefect's cache policy and the stage's run
share the plan), however many stages use them (a real flow run on the demo slice)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from alignet_core.human import data as human_data
from alignet_core.io import sources
from alignet_core.runtime import runner
import flows._config
from flows._config import prepared, resolve_context
from tests.flows.test_alignet_flow import tiny


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of `module.name` (the real function still runs)."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_run_lists_its_source_and_reads_its_human_data_once(harness, tmp_path: Path, monkeypatch) -> None:
    from flows.alignet import alignet

    listed = _counting(monkeypatch, sources, "source_from_config")
    read = _counting(monkeypatch, human_data, "load_human_data")
    checked = _counting(monkeypatch, flows._config, "preflight")
    planned = _counting(monkeypatch, runner, "code_version")  # once in every stage's plan
    state = alignet(overrides=tiny(tmp_path / "d", **{"distill.enabled": False}), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert set(summary.stage_seconds) == {"embed", "transform", "cluster", "sample", "evaluate"}
    # parsed and checked once; embed, transform, cluster, sample and evaluate share one listing and one read
    assert (len(checked), len(listed), len(read)) == (1, 1, 1)
    assert len(planned) == len(summary.stage_seconds)  # each of the five stages planned once


def test_a_prepared_context_is_taken_as_it_is_and_only_for_its_parameters(tmp_path: Path) -> None:
    overrides = tiny(tmp_path / "d")
    ctx = resolve_context(None, overrides)
    with prepared(ctx, None, overrides):
        assert resolve_context(None, overrides) is ctx
        other = resolve_context(None, {**overrides, "cluster.k": 6})
        assert other is not ctx and other.cfg.cluster.k == 6
    assert resolve_context(None, overrides) is not ctx

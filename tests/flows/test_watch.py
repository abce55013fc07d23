"""`alignet watch`: a run's log lines, then how it ended and why (a real Prefect server: the test harness)."""

from __future__ import annotations

import logging
import time

import pytest
from prefect import flow, get_run_logger, task
from prefect.testing.utilities import prefect_test_harness

from alignet_core.errors import InputError
from flows.cli import main
from flows.watch import Outcome, follow


@pytest.fixture(scope="module")
def harness():
    # the suite's PREFECT_LOGGING_LEVEL is WARNING; a watched run's INFO lines (its last one included) must reach
    # the server as they do in a deployment run
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    with prefect_test_harness(server_startup_timeout=120):
        yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


@task
def _explode() -> None:
    raise ValueError("the shard file is truncated")


@flow(name="watched-fails")
def _fails() -> None:
    get_run_logger().info("hello from the watched run")
    _explode()


@flow(name="watched-completes")
def _completes() -> int:
    get_run_logger().info("all good here")
    return 1


def test_a_failed_run_ends_with_its_lines_and_its_reason(harness, capsys):
    state = _fails(return_state=True)
    run_id = str(state.state_details.flow_run_id)
    t0 = time.monotonic()
    items = list(follow(run_id, poll_s=0.2, timeout_s=120, settle_s=90))
    assert time.monotonic() - t0 < 90, "the watch ended on its settle limit, not on the run's last line"
    lines, outcome = items[:-1], items[-1]
    assert isinstance(outcome, Outcome) and outcome.state == "FAILED" and not outcome.ok
    assert any("hello from the watched run" in line for line in lines), lines
    assert any("task _explode" in r and "the shard file is truncated" in r for r in outcome.reasons), outcome.reasons

    assert main(["watch", run_id]) == 1
    out = capsys.readouterr().out
    assert "hello from the watched run" in out and "FAILED" in out and "the shard file is truncated" in out


def test_a_completed_run_exits_zero(harness, capsys):
    state = _completes(return_state=True)
    assert main(["watch", str(state.state_details.flow_run_id)]) == 0
    out = capsys.readouterr().out
    assert "all good here" in out and out.strip().endswith("COMPLETED")


def test_bad_ids_are_one_line_errors(harness, capsys):
    with pytest.raises(InputError, match="expected a UUID"):
        next(follow("not-a-run"))
    assert main(["watch", "00000000-0000-0000-0000-000000000000"]) == 2
    assert "not found on the Prefect server" in capsys.readouterr().err

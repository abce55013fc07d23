"""Data-parallel distillation killed mid-run: a killed rank (any of them) makes every rank resume at the
same step and end on the uninterrupted run's weights; a killed parent leaves no orphan rank. The runs and
fixtures are `test_distill_ranks.py`'s."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from alignet_core.distill.checkpoints import list_checkpoints
from alignet_core.distill.launch import train_on_ranks
from alignet_core.errors import DistributedError
from alignet_core.models.student import LOG_FILE
from tests.distill.test_distill_ranks import STEPS, TOL, _cfg, _weights, data, max_abs_diff, two_ranks  # noqa: F401


def rank_pids(rank: int) -> list[int]:
    """Pids of the training ranks `rank` that this process's launcher started (from their environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("ALIGNET_DISTILL_PARENT") == str(os.getpid()) and env.get("RANK") == str(rank) \
                and "ALIGNET_DISTILL_AGENT" in env:
            found.append(int(entry.name))
    return found


def _killed_then_resumed(rank: int, data: tuple[Path, str], two_ranks: dict, tmp_path: Path,
                         caplog: pytest.LogCaptureFixture) -> None:
    """Kill rank `rank` (SIGKILL, from outside) once rank 0 reports step 3; run again; compare."""
    _, url = data
    cfg = _cfg(tmp_path, devices=["cpu", "cpu"])
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_at_3(step: int, loss: float) -> None:
        if step >= 3 and not killed:
            pids = rank_pids(rank)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(step)

    with pytest.raises(DistributedError, match=rf"distill\.devices: a training rank failed \(rank {rank} was killed by "
                                               r"signal 9\) after step \d+; the run resumes from the checkpoint at step \d+"):
        train_on_ranks(cfg, url, str(out), kill_at_3)
    assert killed and not (out / LOG_FILE).exists()
    at_kill = [s for s, _ in list_checkpoints(str(out / "checkpoints"))]
    assert len(at_kill) == 1 and 2 <= at_kill[0] < STEPS

    caplog.set_level(logging.INFO, logger="alignet_core.distill.launch")
    resumed = train_on_ranks(cfg, url, str(out))
    starts = {int(r): int(s) for r, s in re.findall(r"rank (\d) resuming from \S+ \(step (\d+) of", caplog.text)}
    assert starts == {0: at_kill[0], 1: at_kill[0]}  # every rank at the same step
    np.testing.assert_allclose(resumed["loss_curve"], two_ranks["log"]["loss_curve"], rtol=0, atol=1e-7)
    diff = max_abs_diff(_weights(out), _weights(two_ranks["out"]))
    print(f"rank {rank} killed after step {killed[0]}, resumed at {at_kill[0]}: max |dw| vs uninterrupted = {diff:.3g}")
    assert diff < TOL


@pytest.mark.slow
def test_a_killed_rank_resumes_every_rank_at_the_same_step(data, two_ranks, tmp_path, caplog) -> None:
    _killed_then_resumed(1, data, two_ranks, tmp_path, caplog)


@pytest.mark.slow
def test_killing_rank_0_mid_run_resumes_the_same_way(data, two_ranks, tmp_path, caplog) -> None:
    _killed_then_resumed(0, data, two_ranks, tmp_path, caplog)


# ----------------------------------------------------------------------------- a killed parent
_PARENT = textwrap.dedent(
    """
    import os, sys, json
    from alignet_core.config import parse_config
    from alignet_core.distill.launch import train_on_ranks

    spec = json.loads(sys.argv[1])

    def report(step, loss):
        print(step, flush=True)

    train_on_ranks(parse_config(spec["cfg"]), spec["url"], spec["out"], report)
    """
)


def _descendants_alive(parent: int) -> list[int]:
    """Processes whose environment names `parent` as the launcher's process (the agent and the ranks)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_text()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if f"ALIGNET_DISTILL_PARENT={parent}\0" in environ and state != "Z":
                alive.append(int(entry.name))
    return alive


@pytest.mark.slow
def test_a_killed_parent_leaves_no_orphan_ranks(data: tuple[Path, str], tmp_path: Path) -> None:
    _, url = data
    cfg = _cfg(tmp_path, devices=["cpu", "cpu"], steps=40, checkpoint_every=100)
    spec = {"cfg": cfg.model_dump(mode="json"), "url": url, "out": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # training has started on both ranks
    assert len(_descendants_alive(proc.pid)) == 3  # the agent and two ranks
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while _descendants_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _descendants_alive(proc.pid) == []
    assert not (tmp_path / "run" / LOG_FILE).exists()

"""Two runs on the same artifact root: the second waits for the first and reuses its output, or,
with `lock_timeout`, fails with an error naming the directory and the lock; nothing is corrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignet_core.cluster.stage import plan_cluster, run_cluster
from alignet_core.context import RunContext
from alignet_core.errors import StoreError
from alignet_core.io import lock, store
from tests.reliability.stage_runner import run_until
from tests.reliability.test_stage_kills import SETTINGS, _cfg, assert_same_stage, digests

REPO = Path(__file__).resolve().parents[2]


def _start_holder(root: Path, pause: float) -> subprocess.Popen:
    """A run of the cluster stage that holds its lock: paused `pause` s after the k-means fit."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "tests.reliability.stage_runner", json.dumps({**SETTINGS, "root": str(root)}),
           "cluster", "--pace", "alignet_core.cluster.kmeans:fit_kmeans", str(pause)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "paced 1":
            return proc
    proc.wait()
    pytest.fail(f"the holder ended before fitting: {proc.stderr.read()[-3000:]}")


def test_second_run_fails_clearly_or_waits_and_reuses(tmp_path: Path, one_torch_thread: None) -> None:
    root = tmp_path / "shared"
    cfg = _cfg(root)
    tfm = run_until(cfg, "transform")
    plan = plan_cluster(cfg, tfm)
    holder = _start_holder(root, pause=4.0)
    try:
        # a second writer that may not wait, or only briefly: one clear error, nothing written
        for timeout in (0, 0.5):
            with pytest.raises(StoreError) as err:
                run_cluster(RunContext.of(cfg.model_copy(update={"lock_timeout": timeout})), tfm)
            msg = str(err.value)
            assert plan.dir in msg and lock.lock_path(plan.dir) in msg and "lock_timeout" in msg
            assert not (Path(plan.dir) / store.MANIFEST).exists()
        # a second run that waits (the default): it returns the first run's output, not a recomputation
        out = run_cluster(RunContext.of(cfg), tfm)
        assert holder.wait(timeout=120) == 0, holder.stderr.read()[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    manifest = json.loads((Path(plan.dir) / store.MANIFEST).read_text())
    assert out.metrics.model_dump(mode="json") == manifest["metrics"]  # including the holder's own wall time

    clean_root = tmp_path / "alone"
    alone = run_until(_cfg(clean_root), "cluster")
    assert_same_stage(out, root, alone, clean_root)


def test_lock_of_a_killed_holder_is_released(tmp_path: Path, one_torch_thread: None) -> None:
    root = tmp_path / "shared"
    cfg = _cfg(root)
    tfm = run_until(cfg, "transform")
    holder = _start_holder(root, pause=60.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out = run_cluster(RunContext.of(cfg.model_copy(update={"lock_timeout": 0})), tfm)  # no stale lock
    assert (Path(out.dir) / store.MANIFEST).exists() and digests(Path(out.dir))

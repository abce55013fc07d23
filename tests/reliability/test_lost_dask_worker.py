"""A Dask worker process killed (SIGKILL) in the middle of sampling: its shards are rescheduled on
the other or the restarted worker, and the published dataset is byte-identical to a clean run's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from alignet_core.context import RunContext
from alignet_core.sample.stage import plan_sample, publish_sample
from tests.reliability.stage_runner import paced_shard, run_until
from tests.reliability.test_stage_kills import _cfg, assert_same_stage, no_temporaries

PAUSE = 0.3  # seconds after each shard: more real work per shard than this small pool needs


@pytest.mark.slow
def test_killed_worker_mid_sampling_gives_the_clean_dataset(tmp_path: Path, one_torch_thread: None) -> None:
    clean_root, root = tmp_path / "clean", tmp_path / "lost-worker"
    clean = run_until(_cfg(clean_root), "sample")

    cfg = _cfg(root)
    tfm, clu = run_until(cfg, "transform"), run_until(cfg, "cluster")
    sp = plan_sample(RunContext.of(cfg), tfm, clu)
    shards = Path(sp.plan.dir) / "shards"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        futures = [client.submit(paced_shard, sp, spec, PAUSE, pure=False) for spec in sp.specs]
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:
            busy = [addr for addr, keys in client.processing().items() if keys]
            if len(list(shards.glob("*.npz"))) >= 3 and busy:
                victim = busy[0]
            else:
                time.sleep(0.05)
        assert victim is not None, "no worker was busy after three shards"
        done_before = len(list(shards.glob("*.npz")))
        assert done_before < len(sp.specs), "sampling finished before a worker could be lost"
        os.kill(pids[victim], signal.SIGKILL)
        results = client.gather(futures)  # rescheduled shards finish elsewhere
        assert len(results) == len(sp.specs) == len(set(results))
        assert pids[victim] not in client.run(os.getpid).values()  # the worker really was lost
    out = publish_sample(RunContext.of(cfg), sp)
    assert_same_stage(out, root, clean, clean_root)
    assert no_temporaries(root) == []

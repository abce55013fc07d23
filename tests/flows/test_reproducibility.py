"""docs/reproducibility.md, promise 1: the same inputs on the same machine, with the same thread counts, give
the same dataset bytes, run after run and process after process.

A real Prefect run of the `alignet` flow (embed → transform → cluster → sampling on Dask → publish; distill
and evaluate off: they do not touch the dataset) in this process, then `alignet run` as a user starts it, in
a fresh process on the same Prefect server, with this process's environment as it was before Dask changed
it (so the same kernels and thread counts), on a fresh root. Every published .npz file has the same sha256, and so does every array the
stages before it hand on (embeddings, transformed store, cluster assignments).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect.settings import get_current_settings
from prefect.testing.utilities import prefect_test_harness

from alignet_core.io.embedding_store import open_embeddings
from alignet_core.sample import versions
from flows.alignet import alignet

REPO = Path(__file__).resolve().parents[2]
#: this process's environment before any Dask cluster ran: a LocalCluster of worker processes sets
#: OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS = 1 (and MALLOC_TRIM_THRESHOLD_) in its parent's
#: os.environ and leaves them there, so a process started after the first run's sampling would run on one
#: thread: another thread count, other bytes (docs/reproducibility.md)
ENV_BEFORE_DASK = dict(os.environ)
SMALL = {"source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4, "cluster.k": 5,
         "sample.n_train": 1200, "sample.n_valid": 300, "sample.shard_size": 400, "sample.n_workers": 2,
         "distill.enabled": False, "evaluate.enabled": False}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every published .npz of the latest `demo` version under `root`, and of the arrays each stage
    before it hands on."""
    latest = versions.list_versions(str(root), "demo")
    assert len(latest) == 1, latest
    out = {f"dataset/{p.name}": _sha(p.read_bytes()) for p in sorted(Path(latest[0]["path"]).rglob("*.npz"))}
    for stage in ("embed", "transform"):
        (store,) = (root / "stages" / stage).glob("*/*.zarr")
        out[stage] = _sha(np.ascontiguousarray(open_embeddings(str(store))["embeddings"][:]).tobytes())
    (clusters,) = (root / "stages" / "cluster").glob("*/assignments.npy")
    out["cluster"] = _sha(np.load(clusters).tobytes())
    return out


@pytest.mark.numerics
def test_a_run_repeated_in_another_process_publishes_identical_bytes(harness, tmp_path: Path) -> None:
    first = tmp_path / "first"
    state = alignet(overrides={"root": str(first), **SMALL}, return_state=True)
    assert state.is_completed(), state
    here = _fingerprint(first)
    assert sum(k.startswith("dataset/") for k in here) == 4

    second = tmp_path / "second"
    args = [sys.executable, "-m", "flows.cli", "run", "--root", str(second)]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    env = {**ENV_BEFORE_DASK, "PREFECT_API_URL": str(get_current_settings().api.url),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _fingerprint(second) == here

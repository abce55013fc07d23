"""A sampling run killed with SIGKILL resumes: finished shards are kept (not rewritten), the rest
are made, and the published files are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from alignet_core.io import embedding_store
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import plan_shards, run_shard, shard_path

REPO = Path(__file__).resolve().parents[2]
NAMES = {"cluster_border": "cluster_border_5"}
N_TRAIN, N_VALID, SHARD, SEED = 4000, 400, 200, 3

# the killed run: every shard in order, with a pause standing in for real work per shard
RUNNER = """
import sys, time
import numpy as np
from alignet_core.sample.shards import plan_shards, run_shard
groups, store_url, out = sys.argv[1:4]
for spec in plan_shards(["cluster_border"], {n_train}, {n_valid}, {shard}, seed={seed}):
    run_shard(spec, groups, store_url, out)
    time.sleep(0.15)
""".format(n_train=N_TRAIN, n_valid=N_VALID, shard=SHARD, seed=SEED)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.npz"))}


def _pool(root: Path) -> tuple[str, str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, p = 400, 8
    ids = np.array([f"img/{i:04d}.jpg" for i in range(n)])
    url = str(root / "emb.zarr")
    g = embedding_store.create_embedding_store(url, n, p, ids, "float16", 50, {})
    g["embeddings"][:] = rng.normal(size=(n, p)).astype(np.float16)
    g["valid"][:] = True
    np.save(root / "clusters.npy", rng.integers(0, 5, n))
    return str(root / "clusters.npy"), url, ids


def test_killed_sampling_run_resumes_to_identical_output(tmp_path: Path) -> None:
    groups, url, ids = _pool(tmp_path)
    specs = plan_shards(["cluster_border"], N_TRAIN, N_VALID, SHARD, seed=SEED)
    killed = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, groups, url, killed], env=env)
    shards_dir = Path(killed) / "shards"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(shards_dir.glob("*.npz"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards_dir.glob("*.npz")}
    assert 3 <= len(finished) < len(specs)

    for spec in specs:  # the rerun
        run_shard(spec, groups, url, killed)
    for p, stat in finished.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat, f"{p.name} was rewritten"
    # a write cut by the kill leaves at most a `*.npz.tmp-*` file, never a partial shard
    assert sorted(p.name for p in shards_dir.glob("*.npz")) == sorted(Path(shard_path(killed, s)).name for s in specs)
    assemble_dataset(killed, specs, ids, str(tmp_path / "pub-killed"), NAMES)

    clean = str(tmp_path / "clean")
    for spec in specs:
        run_shard(spec, groups, url, clean)
    assemble_dataset(clean, specs, ids, str(tmp_path / "pub-clean"), NAMES)
    a, b = _digest(tmp_path / "pub-killed"), _digest(tmp_path / "pub-clean")
    assert len(a) == 2 and a == b

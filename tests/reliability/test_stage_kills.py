"""SIGKILL the pipeline process in the middle of each stage, rerun, and get the clean run's bytes.

Each case runs the real stage function (each package's `stage.py`) on a small real pipeline (48 demo
emoji, timm's `test_resnet`, proxy triplets, FAISS k-means, two sampling strategies) in a child
process, kills it with SIGKILL at a random point after real work started (after a random number
of units of the paced function, plus a random delay), checks that nothing half-written is visible
(no manifest; no published dataset), reruns the stage in a fresh state and compares every output
file's sha256 with an uninterrupted run's. The kill points come from a seeded generator, printed
on failure. Sampling shards and distillation have their own kill tests
(`test_sampling_resume.py`, `tests/distill/test_distill.py`); here sampling is killed while it
publishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignet_core.config import PipelineConfig, parse_config
from alignet_core.io import store
from alignet_core.runtime.runner import STAGE_FILES
from tests.reliability.stage_runner import STAGES, run_until

REPO = Path(__file__).resolve().parents[2]

SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "seed": 1,
    "source": {"limit": 48},
    "embed": {"model": "test_resnet", "weights": None, "batch_size": 8, "chunk_rows": 8},
    "human": {"proxy_n_triplets": 1500},
    "transform": {"epochs": 3, "chunk_rows": 6, "batch_size": 256, "local_batch": 16, "patience": 5},
    "cluster": {"k": 4, "chunk_rows": 16},
    "sample": {"strategies": ["cluster_border", "between_class"], "n_train": 300, "n_valid": 60, "shard_size": 50},
    "distill": {"enabled": False},
}

# (stage, paced function, units it is called in a clean run's stage, pause after each)
CASES = {
    "embed-chunks": ("embed", "alignet_core.io.embedding_store:ChunkProgress.mark", 6, 0.3),
    "transform-fit": ("transform", "alignet_core.transform.fit:scaled_identity_penalty", 15, 0.05),
    "transform-apply": ("transform", "alignet_core.io.embedding_store:ChunkProgress.mark", 8, 0.2),
    "cluster-save": ("cluster", "alignet_core.io.store:write_bytes_atomic", 4, 0.3),
    "sample-shards": ("sample", "alignet_core.sample.stage:run_shard", 14, 0.15),
    "sample-publish": ("sample", "alignet_core.sample.publish:write_alignet_npz", 4, 0.3),
}
FAST = {"transform-apply", "cluster-save"}


def _cfg(root: Path) -> PipelineConfig:
    return parse_config({**SETTINGS, "root": str(root)})


def _upstream(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i - 1] if i else None


def digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (the top-level names in `skip` left out)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel.split("/")[0] not in skip:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def comparable_manifest(path: Path, root: Path) -> Any:
    """A stage manifest with its root replaced and wall times (`seconds`, `*_seconds`) dropped, and the
    checksums of its sampling shards (np.savez stamps the time into them: `assert_same_stage` compares
    their arrays)."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict) and isinstance(obj.get(STAGE_FILES), dict):
            obj = {**obj, STAGE_FILES: {k: {"size": v["size"]} if k.startswith("shards/") else v
                                        for k, v in obj[STAGE_FILES].items()}}
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "seconds" and not k.endswith("_seconds")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj.replace(str(root), "<root>") if isinstance(obj, str) else obj

    return strip(json.loads(path.read_text()))


def assert_same_stage(out_a: Any, root_a: Path, out_b: Any, root_b: Path) -> None:
    """Two runs of one stage wrote the same bytes (shards: the same arrays) and equal manifests."""
    assert out_a.key == out_b.key
    a, b = Path(out_a.dir), Path(out_b.dir)
    skip = (store.MANIFEST, "shards")
    assert digests(a, skip) == digests(b, skip)
    assert comparable_manifest(a / store.MANIFEST, root_a) == comparable_manifest(b / store.MANIFEST, root_b)
    if (a / "shards").is_dir():  # np.savez stamps the time into shard files: compare their arrays
        names = sorted(p.name for p in (a / "shards").glob("*.npz"))
        assert names == sorted(p.name for p in (b / "shards").glob("*.npz"))
        for name in names:
            with np.load(a / "shards" / name) as x, np.load(b / "shards" / name) as y:
                assert sorted(x.files) == sorted(y.files)
                for k in x.files:
                    np.testing.assert_array_equal(x[k], y[k])
    if out_a.stage == "sample":  # the published dataset, byte for byte
        assert digests(Path(out_a.artifact)) == digests(Path(out_b.artifact))


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.tmp-*")]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run of every stage: (root, {stage: StageOutput})."""
    root = tmp_path_factory.mktemp("clean")
    cfg = _cfg(root)
    return root, {stage: run_until(cfg, stage) for stage in STAGES}


def kill_during(stage: str, target: str, units: int, pause: float, root: Path, seed: int) -> str:
    """Run `stage` in a child process and SIGKILL it after a random number of paced units plus a
    random delay; returns a description of the kill point."""
    rng = random.Random(seed)
    after = rng.randint(1, units - 1)
    delay = rng.uniform(0.0, 1.5 * pause)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "tests.reliability.stage_runner", json.dumps({**SETTINGS, "root": str(root)}),
           stage, "--pace", target, str(pause)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    where = f"{stage}: after {after} call(s) of {target} + {delay:.2f} s (seed {seed})"
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == f"paced {after}":
                break
        else:
            pytest.fail(f"{where}: the child ended before the kill point; stderr:\n{proc.stderr.read()[-3000:]}")
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{where}: the child was not killed (rc {proc.returncode})"
    return where


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in CASES]
)
def test_killed_stage_reruns_to_the_clean_bytes(case: str, clean, tmp_path: Path, one_torch_thread: None) -> None:
    stage, target, units, pause = CASES[case]
    clean_root, clean_outs = clean
    root = tmp_path / "killed"
    cfg = _cfg(root)
    if (up := _upstream(stage)) is not None:
        run_until(cfg, up)
    seed = sum(map(ord, case))
    where = kill_during(stage, target, units, pause, root, seed)

    # nothing half-written is visible: the stage has no manifest, a dataset is whole or absent
    plan_dir = Path(clean_outs[stage].dir.replace(str(clean_root), str(root)))
    assert not (plan_dir / store.MANIFEST).exists(), where
    if stage == "sample":  # the dataset version folder (artifact = <version>/<folder>) appears whole
        version = Path(clean_outs[stage].artifact.replace(str(clean_root), str(root))).parent
        assert not version.exists() or (version / store.MANIFEST).exists(), where

    out = run_until(cfg, stage)  # the rerun, in this (fresh) process
    assert_same_stage(out, root, clean_outs[stage], clean_root)
    assert no_temporaries(root) == [], where


def test_a_second_rerun_reuses_and_rewrites_nothing(clean) -> None:
    clean_root, clean_outs = clean
    before = {s: (Path(o.dir) / store.MANIFEST).stat().st_mtime_ns for s, o in clean_outs.items()}
    again = run_until(_cfg(clean_root), "sample")
    assert again == clean_outs["sample"]
    assert before == {s: (Path(o.dir) / store.MANIFEST).stat().st_mtime_ns for s, o in clean_outs.items()}

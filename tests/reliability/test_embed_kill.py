"""SIGKILL the embed stage while it writes, rerun it, and get an uninterrupted run's store, bit for bit.

The stage (`embed.stage.run_embed`, through `stage_runner`, as the pipeline runs it) embeds a generated
folder of 120 JPEGs plus odd files (a CMYK, a grayscale, an EXIF-rotated JPEG, a PNG, and three
undecodable files) with timm's `test_resnet` (seeded random init), 8 rows per chunk, in a child
process. The test polls the store's finished-chunk markers and kills the child (SIGKILL, no warning)
once at least one chunk is recorded, after a seeded random delay of up to one chunk's time, so the
kill lands between or inside chunks. The rerun must leave the chunks finished before the kill
untouched and end with the uninterrupted run's store: embeddings, ids, valid mask, skipped-file
lists and provenance, every file byte for byte.

With `embed.devices: [cpu, cpu]` the child is the parent of two Dask worker processes (and their
loader workers); only the parent is killed, and every process under it must exit by itself
(distributed's workers watch their parent), so no orphan writes into the store while it is rerun.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zarr

from alignet_core.config import PipelineConfig, parse_config
from alignet_core.embed.stage import plan_embed
from alignet_core.io import store
from tests.generated_images import write_jpeg_folder, write_odd_files
from tests.reliability.stage_runner import run_until
from tests.reliability.test_stage_kills import comparable_manifest, digests

REPO = Path(__file__).resolve().parents[2]
EMBED: dict[str, Any] = {"model": "test_resnet", "weights": None, "batch_size": 4, "chunk_rows": 8, "num_workers": 1,
                         "max_skipped_fraction": 0.05}  # 3 undecodable files of 129


def _settings(root: Path, images: Path, devices: list[str] | None) -> dict[str, Any]:
    embed = {**EMBED, **({"devices": devices} if devices else {})}
    return {"device": "cpu", "root": str(root), "source": {"kind": "folder", "path": str(images)}, "embed": embed}


def _cfg(root: Path, images: Path, devices: list[str] | None = None) -> PipelineConfig:
    return parse_config(_settings(root, images, devices))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_jpeg_folder(root, 120, seed=3, size=(300, 700))
    write_odd_files(root / "odd")
    return root


@pytest.fixture(scope="module")
def clean(images: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, Any]:
    """An uninterrupted single-process run: (root, StageOutput)."""
    root = tmp_path_factory.mktemp("clean")
    return root, run_until(_cfg(root, images), "embed")


def _done(store_url: str) -> set[int]:
    progress = Path(store_url) / "_progress"
    return {int(p.name.split(".")[0]) for p in progress.glob("*.done")} if progress.is_dir() else set()


def kill_after_first_chunk(cfg_json: str, store_url: str, chunk_seconds: float, seed: int,
                           pace: tuple[str, float] | None = None) -> tuple[set[int], str]:
    """Run the embed stage in a child process; SIGKILL it once a chunk is recorded (+ a random delay).
    `pace` (function, seconds) is `stage_runner`'s `--pace`: a pause after each call of that function.

    Returns (chunks recorded at the kill, a description of the kill point). Every process under the
    child must end within 30 s of the kill."""
    delay = random.Random(seed).uniform(0.0, chunk_seconds)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "tests.reliability.stage_runner", cfg_json, "embed"]
    if pace is not None:
        cmd += ["--pace", pace[0], str(pace[1])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not _done(store_url):
            if proc.poll() is not None:
                pytest.fail(f"the child ended (rc {proc.returncode}) before a chunk was recorded; stderr:\n"
                            f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no chunk recorded within 240 s")
            time.sleep(0.005)
        time.sleep(delay)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        at_kill = _done(store_url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed (rc {proc.returncode})"
    deadline = time.monotonic() + 30
    while (alive := [p for p in descendants if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in alive:
        p.kill()
    assert not alive, f"processes outlived the killed stage: {alive}"
    return at_kill, f"killed {delay:.2f} s after the first chunk marker (seed {seed}), {len(at_kill)} chunk(s) recorded"


def _running(p: psutil.Process) -> bool:
    """True while `p` runs; an exited process that nobody has reaped yet (a zombie) has ended."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _chunk_files(store_url: str, chunks: set[int]) -> dict[str, int]:
    """mtime (ns) of the marker and embeddings/valid chunk files of finished chunks."""
    base = Path(store_url)
    files = [base / "_progress" / f"{i:08d}.done" for i in chunks]
    files += [base / "embeddings" / "c" / str(i) / "0" for i in chunks] + [base / "valid" / "c" / str(i) for i in chunks]
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in files}


def assert_same_embed_store(out: Any, root: Path, ref: Any, ref_root: Path) -> None:
    """Two embed stage outputs hold the same store (file for file) and report the same images and skips."""
    a, b = zarr.open_group(out.artifact, mode="r"), zarr.open_group(ref.artifact, mode="r")
    assert a["embeddings"].dtype == b["embeddings"].dtype
    np.testing.assert_array_equal(a["embeddings"][:], b["embeddings"][:])
    np.testing.assert_array_equal(a["ids"][:], b["ids"][:])
    np.testing.assert_array_equal(a["valid"][:], b["valid"][:])
    assert dict(a.attrs) == dict(b.attrs)
    assert digests(Path(out.artifact)) == digests(Path(ref.artifact))  # chunks, skipped lists, markers, metadata
    got = comparable_manifest(Path(out.dir) / store.MANIFEST, root)["metrics"]
    want = comparable_manifest(Path(ref.dir) / store.MANIFEST, ref_root)["metrics"]
    assert got == want
    assert [s["id"] for s in got["skipped"]] == ["odd/empty.jpg", "odd/text.jpg", "odd/truncated.jpg"]


@pytest.mark.parametrize("devices", [
    pytest.param(None, id="one-process"),
    pytest.param(["cpu", "cpu"], id="two-cpu-workers", marks=pytest.mark.slow),
])
def test_sigkilled_embed_reruns_to_the_uninterrupted_store(
    devices: list[str] | None, images: Path, clean, tmp_path: Path, one_torch_thread: None
) -> None:
    clean_root, clean_out = clean
    root = tmp_path / "killed"
    cfg = _cfg(root, images, devices)
    plan = plan_embed(cfg)
    url = store.join(plan.dir, "embeddings.zarr")
    n_chunks = -(-clean_out.metrics.n_images // EMBED["chunk_rows"])
    chunk_seconds = clean_out.metrics.seconds / n_chunks
    seed = 7 if devices is None else 8
    at_kill, where = kill_after_first_chunk(json.dumps(_settings(root, images, devices)), url, chunk_seconds, seed)

    assert 1 <= len(at_kill) < n_chunks, f"{where}: the kill should land mid-run ({n_chunks} chunks)"
    assert not store.is_complete(plan.dir), where
    before = _chunk_files(url, at_kill)
    out = run_until(cfg, "embed")  # the rerun, in this process
    assert _chunk_files(url, at_kill) == before, f"{where}: chunks finished before the kill were redone"
    assert_same_embed_store(out, root, clean_out, clean_root)
    assert [str(p) for p in root.rglob("*.tmp-*")] == [], where

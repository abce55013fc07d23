"""A disk that fills up in the middle of a stage: one clear `StoreError` naming the directory, no
manifest, no half-published dataset; after freeing space the rerun resumes to the clean bytes.

The artifact root lives on a small real tmpfs (mounting one needs root; the test is skipped with the
reason otherwise). The free space is set to half of what the stage writes, measured on a clean run
of the same stage on the same filesystem, so the disk fills up part-way through the stage's writes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignet_core.errors import StoreError
from alignet_core.io import store
from tests.reliability.stage_runner import STAGES, run_until
from tests.reliability.test_stage_kills import _cfg, assert_same_stage, no_temporaries


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 16 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill up needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(_free(path) - leave, 0))
    return filler


@pytest.mark.parametrize("stage", ["embed", "transform", "cluster", "sample"])
def test_disk_full_mid_stage_is_a_clear_error_and_resumes(stage: str, tmpfs: Path, one_torch_thread: None) -> None:
    up = STAGES[STAGES.index(stage) - 1] if stage != "embed" else None
    clean_root, root = tmpfs / "clean", tmpfs / "full"
    if up:
        run_until(_cfg(clean_root), up)
    before = _free(tmpfs)
    clean = run_until(_cfg(clean_root), stage)
    written = before - _free(tmpfs)
    assert written > 0

    cfg = _cfg(root)
    if up:
        run_until(cfg, up)
    filler = _fill(tmpfs, leave=written // 2)
    with pytest.raises(StoreError) as err:
        run_until(cfg, stage)
    msg = str(err.value)
    assert "no space left" in msg and str(root) in msg and "rerun" in msg
    assert not (Path(clean.dir.replace(str(clean_root), str(root))) / store.MANIFEST).exists()
    if stage == "sample":
        assert not Path(clean.artifact.replace(str(clean_root), str(root))).exists()

    filler.unlink()
    out = run_until(cfg, stage)
    assert_same_stage(out, root, clean, clean_root)
    assert no_temporaries(root) == []

"""The files a stage wrote, recorded in its manifest: a reuse checks their sizes, `alignet verify` their
sha256 (issue 34: a flipped bit in a stage file, or in a published `.npz`, was reused silently)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from alignet_core.errors import StoreError
from alignet_core.io import lock, store
from alignet_core.runtime.runner import STAGE_FILES, StageMetrics, StageOutput, StagePlan, finish, reuse, verify_stages
from flows.cli import main
from tests.reliability.stage_runner import run_until
from tests.reliability.test_stage_kills import _cfg
from tests.sample.test_versions import _publish


def _finished(root: Path) -> StagePlan:
    """A finished toy stage: an array, a Zarr-like folder of chunks, plus a lock, a temporary and the
    Prefect cache's generation file (none of which are the stage's files)."""
    plan = StagePlan(stage="cluster", key="k1", dir=store.stage_dir(str(root), "cluster", "k1"), code_version="c")
    d = Path(plan.dir)
    (d / "store.zarr" / "embeddings" / "c").mkdir(parents=True)
    np.save(d / "assignments.npy", np.arange(100, dtype=np.int32))
    for i in range(3):
        (d / "store.zarr" / "embeddings" / "c" / str(i)).write_bytes(bytes([i]) * (10 + i))
    (d / f"late.npy.tmp-{'0' * 32}").write_bytes(b"half")
    (d / "inner.lock").write_bytes(b"")
    (d / store.GENERATION_FILE).write_text('{"flow_run": "x"}')
    Path(lock.lock_path(plan.dir)).write_bytes(b"")  # beside the directory, not in it
    finish(plan, StageOutput, str(d / "assignments.npy"), StageMetrics(seconds=1.0), {}, [])
    return plan


def _flip(path: Path, at: int = -1) -> None:
    """Change one byte in place: same size, another sha256."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_finish_records_every_stage_file_with_its_size_and_sha256(tmp_path: Path) -> None:
    plan = _finished(tmp_path)
    d = Path(plan.dir)
    recorded = json.loads((d / store.MANIFEST).read_text())[STAGE_FILES]
    assert sorted(recorded) == ["assignments.npy", "store.zarr/embeddings/c/0", "store.zarr/embeddings/c/1",
                                "store.zarr/embeddings/c/2"]
    for rel, info in recorded.items():
        assert info == {"size": (d / rel).stat().st_size, "sha256": hashlib.sha256((d / rel).read_bytes()).hexdigest()}
    assert reuse(plan, StageOutput) is not None
    assert verify_stages(str(tmp_path))[0].model_dump() == {"dir": plan.dir, "files": 4, "problems": []}


def test_a_byte_flipped_in_place_is_reused_but_verify_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Reuse checks sizes only (a listing, no file read): a same-size change passes it; `alignet verify
    --stages` re-hashes and names the file (exit 1)."""
    plan = _finished(tmp_path)
    _flip(Path(plan.dir) / "assignments.npy")
    assert reuse(plan, StageOutput) is not None  # documented: sizes only on reuse
    assert verify_stages(str(tmp_path))[0].problems == ["assignments.npy: sha256 differs from the manifest"]
    capsys.readouterr()
    assert main(["verify", "--stages", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert f"FAILED {plan.dir}: assignments.npy: sha256 differs from the manifest" in out.out.splitlines()
    assert "1 problem(s)" in out.err
    config = tmp_path / "my.yaml"
    config.write_text(f"root: {tmp_path}\n")
    assert main(["verify", "--stages", "-c", str(config)]) == 1  # the root taken from the config
    assert "sha256 differs" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["truncate", "append", "delete"])
def test_a_stage_file_of_another_size_or_missing_stops_the_reuse(tmp_path: Path, change: str) -> None:
    plan = _finished(tmp_path)
    path = Path(plan.dir) / "store.zarr" / "embeddings" / "c" / "1"
    if change == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-1] if change == "truncate" else path.read_bytes() + b"\0")
    with pytest.raises(StoreError) as err:
        reuse(plan, StageOutput)
    msg = str(err.value)
    what = {"truncate": "10 bytes, the manifest recorded 11", "append": "12 bytes, the manifest recorded 11",
            "delete": "missing"}[change]
    assert "\n" not in msg
    assert msg.startswith(f"cluster stage {plan.dir!r} changed since it finished: store.zarr/embeddings/c/1: {what}")
    assert f"Delete {plan.dir!r} to recompute it" in msg and "alignet verify --stages" in msg


def test_a_manifest_written_before_file_lists_is_still_reused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = _finished(tmp_path)
    path = Path(plan.dir) / store.MANIFEST
    old = json.loads(path.read_text())
    del old[STAGE_FILES]
    path.write_text(json.dumps(old))
    (Path(plan.dir) / "assignments.npy").write_bytes(b"anything")  # nothing recorded, so nothing to compare
    assert reuse(plan, StageOutput) is not None
    assert verify_stages(str(tmp_path))[0].files is None
    assert main(["verify", "--stages", "--root", str(tmp_path)]) == 0
    assert f"unchecked {plan.dir}: its manifest records no files" in capsys.readouterr().out


def test_a_recorded_path_outside_the_stage_directory_is_never_read(tmp_path: Path) -> None:
    plan = _finished(tmp_path / "root")
    (tmp_path / "secret").write_bytes(b"12345")
    path = Path(plan.dir) / store.MANIFEST
    m = json.loads(path.read_text())
    m[STAGE_FILES] = {"../../../../secret": {"size": 5, "sha256": "0" * 64}}
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="points outside the stage directory; not read"):
        reuse(plan, StageOutput)
    assert verify_stages(str(tmp_path / "root"))[0].problems == [
        "../../../../secret: points outside the stage directory; not read"]


def test_a_real_cluster_stage_and_a_published_dataset_through_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture, one_torch_thread: None) -> None:
    """The real embed → transform → cluster stages: a flipped byte in `assignments.npy` is reused by a rerun
    and reported by `alignet verify --stages`; one byte appended stops the rerun. A flipped byte in a
    published `.npz` is reported by `alignet verify` (stages and datasets)."""
    root = tmp_path / "root"
    clu = run_until(_cfg(root), "cluster")
    recorded = json.loads((Path(clu.dir) / store.MANIFEST).read_text())[STAGE_FILES]
    assert {"assignments.npy", "centroids.npy", "kmeans.json"} <= set(recorded)
    embed_dir = Path(run_until(_cfg(root), "embed").dir)
    assert any(rel.startswith("embeddings.zarr/") for rel in json.loads((embed_dir / store.MANIFEST).read_text())[STAGE_FILES])
    assert main(["verify", "--root", str(root)]) == 0
    assert "3 finished stage directories" in capsys.readouterr().out

    assignments = Path(clu.dir) / "assignments.npy"
    _flip(assignments)
    assert run_until(_cfg(root), "cluster").dir == clu.dir  # reused: a same-size change needs `verify`
    assert main(["verify", "--stages", "--root", str(root)]) == 1
    assert f"FAILED {clu.dir}: assignments.npy: sha256 differs from the manifest" in capsys.readouterr().out.splitlines()

    assignments.write_bytes(assignments.read_bytes() + b"\0")
    with pytest.raises(StoreError, match=r"cluster stage .* changed since it finished: assignments.npy: \d+ bytes"):
        run_until(_cfg(root), "cluster")

    _publish(root, "v1", seed=1)
    npz = root / "datasets" / "demo" / "v1" / "uncertainty_distillation" / "train_between_class.npz"
    _flip(npz, at=len(npz.read_bytes()) // 2)
    capsys.readouterr()
    assert main(["verify", "--datasets", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAILED dataset demo version v1: uncertainty_distillation/train_between_class.npz: sha256 differs" in out
    assert "stages:" not in out

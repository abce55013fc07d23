"""The `alignet` flow on imported embeddings (`source.kind: embeddings`), under Prefect's test harness:
a float16 .npy with a known cluster structure, its ids and labels → import → transform (the taxonomy
proxy from the labels) → k-means → sampling → publication → evaluation of the teacher; distillation is
skipped with a message that says why (no image source joined), and the report names the import."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from prefect.testing.utilities import prefect_test_harness

from alignet_core.io import formats
from flows.alignet import alignet

N, P, K = 240, 24, 4


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_import(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A float16 (N, P) .npy of K well-separated blobs, ids.txt and labels.txt (the blob of each row)."""
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(K, P)) * 6
    blob = rng.integers(0, K, size=N)
    x = (centers[blob] + rng.normal(size=(N, P))).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "emb.npy", x)
    (folder / "ids.txt").write_text("".join(f"n{i:05d}.JPEG\n" for i in range(N)))
    (folder / "labels.txt").write_text("".join(f"class{b}\n" for b in blob))
    return x, blob


def test_flow_runs_every_stage_on_imported_embeddings(harness, tmp_path: Path) -> None:
    x, _ = write_import(tmp_path / "data")
    data = tmp_path / "data"
    overrides = {
        "root": str(tmp_path / "root"), "device": "cpu",
        "source.kind": "embeddings", "source.path": str(data / "emb.npy"), "source.ids": str(data / "ids.txt"),
        "source.labels": str(data / "labels.txt"),
        "embed.store_dtype": "float16", "embed.chunk_rows": 64,
        "human.proxy_n_triplets": 3000, "transform.epochs": 3, "cluster.k": K,
        "sample.n_train": 900, "sample.n_valid": 300, "sample.shard_size": 300, "sample.n_workers": 1,
        "evaluate.n_per_level": 200,
    }
    state = alignet(overrides=overrides, return_state=True)
    assert state.is_completed(), state
    summary = state.result().model_dump(mode="json")

    assert set(summary["stage_seconds"]) == {"embed", "transform", "cluster", "sample", "evaluate"}
    sha = hashlib.sha256((data / "emb.npy").read_bytes()).hexdigest()
    assert summary["teacher"].startswith(f"imported: {data / 'emb.npy'} (npy, 240 × 24 float16, sha256 {sha[:12]}")
    assert "embed.model and the other teacher settings do not apply" in summary["teacher"]
    assert summary["notes"] and summary["notes"][0].startswith("Distillation: skipped: the rows are imported embeddings")
    report = (Path(summary["report_dir"]) / "report.md").read_text()
    assert "Teacher: imported:" in report and "Distillation: skipped" in report
    assert summary["images"] == N and summary["cluster_ari"] > 0.9  # the blobs are recovered from the labels' view
    assert summary["student_acc_after"] is None and set(summary["alignment_models"]) == {"teacher_raw", "teacher_aligned"}

    embed_dir = tmp_path / "root" / "stages" / "embed" / summary["stage_keys"]["embed"]
    g = zarr.open_group(str(embed_dir / "embeddings.zarr"), mode="r")
    assert g["embeddings"][:].tobytes() == x.tobytes()  # float16 kept as float16, bit for bit
    assert g.attrs["import"]["sha256"] == sha
    dataset = Path(summary["dataset"])
    for f in dataset.glob("*.npz"):
        split = formats.read_alignet_npz(str(f), n_images=N)
        assert split.n_reordered == 0 and len(split) > 0
        assert set(np.asarray(split.filenames).ravel()) <= {f"n{i:05d}.JPEG" for i in range(N)}

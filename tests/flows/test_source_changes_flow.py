"""Issue 35 through real Prefect flow runs: a folder source that grows, shrinks or has an image replaced is
a new embed key; the regeneration embeds only what changed, and every later stage (the transform fitted
on the taxonomy proxy of the class folders, k-means) sees the same image list as the store it reads: no
stale rows, no shape error. What changed is in the embed output's metrics and the `embed-changes`
artifact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from prefect import get_client
from prefect.testing.utilities import prefect_test_harness

from alignet_core.io.sources import demo_source


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _overrides(root: Path, folder: Path) -> dict:
    return {"root": str(root), "device": "cpu", "source.kind": "folder", "source.path": str(folder),
            "embed.model": "test_resnet", "embed.weights": None, "embed.chunk_rows": 16, "embed.batch_size": 8,
            "human.proxy_n_triplets": 2000, "transform.epochs": 3, "cluster.k": 2}


def _run(overrides: dict):
    from flows.stages import FLOWS

    state = FLOWS["cluster"](overrides=overrides, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _embed_output(root: Path, run_id) -> dict:
    """The embed store of the run's embed task, its metrics' changes and the run's embed-changes artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    changes = {a.key: json.loads(a.data) for a in arts if a.key == "embed-changes"}
    return changes.get("embed-changes")


def test_grown_shrunk_and_replaced_folders_run_through_the_flow(harness, tmp_path: Path) -> None:
    recs = demo_source().records
    folder = tmp_path / "images"
    for k, rec in enumerate(recs[:: 47][:40]):
        (folder / ("faces" if k % 2 else "objects")).mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / ("faces" if k % 2 else "objects") / Path(rec.path).name)
    o = _overrides(tmp_path / "root", folder)

    def rows(out) -> int:
        return int(np.load(out.artifact).shape[0])

    first, _ = _run(o)
    assert rows(first) == 40

    shutil.copy(recs[1].path, folder / "faces" / "new.png")  # grown: the operator's case
    grown, run_id = _run(o)
    assert rows(grown) == 41 and grown.key != first.key
    table = {r["change"]: r for r in _embed_output(tmp_path, run_id)}
    assert (table["added"]["images"], table["reused"]["images"]) == (1, 40)
    assert table["added"]["examples"] == "faces/new.png"

    victim = min((folder / "objects").iterdir())  # replaced: same name, new bytes
    before = victim.stat().st_mtime_ns
    shutil.copy(recs[2].path, victim)
    os.utime(victim, ns=(before + 10**9, before + 10**9))
    replaced, run_id = _run(o)
    assert rows(replaced) == 41 and replaced.key != grown.key
    table = {r["change"]: r for r in _embed_output(tmp_path, run_id)}
    assert (table["changed"]["images"], table["reused"]["images"]) == (1, 40)

    (folder / "faces" / "new.png").unlink()  # shrunk
    shrunk, run_id = _run(o)
    assert rows(shrunk) == 40
    table = {r["change"]: r for r in _embed_output(tmp_path, run_id)}
    assert (table["removed"]["images"], table["reused"]["images"]) == (1, 40)

    again, _ = _run(o)  # nothing changed: every stage reused, the listing its only cost
    assert again.key == shrunk.key
    stores = sorted(d for d in (tmp_path / "root" / "stages" / "embed").iterdir() if (d / "manifest.json").exists())
    assert len(stores) == 4  # first, grown, replaced, shrunk
    for d in stores:
        g = zarr.open_group(str(d / "embeddings.zarr"), mode="r")
        assert g["source_size"].shape == g["ids"].shape


def test_the_run_report_says_what_changed(harness, tmp_path: Path) -> None:
    """`alignet` end to end on a class-folder source (the operator's `alignet sample` case, then the report):
    after an image is copied in, the run succeeds on 41 images and `summary.json` and `report.md` carry the
    added/changed/removed counts against the previous store, with the added id."""
    from flows.alignet import alignet
    from tests.flows.test_alignet_flow import tiny

    recs = demo_source().records
    folder = tmp_path / "images"
    classes = ("faces", "objects", "symbols")  # the class strategies need three groups
    for k, rec in enumerate(recs[::47][:40]):
        (folder / classes[k % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / classes[k % 3] / Path(rec.path).name)
    o = {**tiny(tmp_path / "root"), **_overrides(tmp_path / "root", folder), "distill.enabled": False, "cluster.k": 3,
         "sample.n_train": 300, "sample.n_valid": 60, "sample.shard_size": 200, "evaluate.n_per_level": 100}
    o.pop("source.limit")
    assert alignet(overrides=o, return_state=True).is_completed()
    shutil.copy(recs[1].path, folder / "faces" / "new.png")
    state = alignet(overrides=o, return_state=True)
    assert state.is_completed(), state
    summary = json.loads((Path(state.result().report_dir) / "summary.json").read_text())
    assert summary["images"] == 41
    c = summary["source_changes"]
    assert (c["added"], c["changed"], c["removed"], c["reused"]) == (1, 0, 0, 40) and c["added_examples"] == [
        "faces/new.png"]
    report = (Path(state.result().report_dir) / "report.md").read_text()
    assert "## Images" in report and "1 added (e.g. `faces/new.png`); 0 changed; 0 removed" in report


def _embed_flow(overrides: dict):
    from flows.stages import FLOWS

    state = FLOWS["embed"](overrides=overrides, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


@pytest.mark.parametrize("kind", ["filelist", "tar"])
def test_a_file_list_and_tar_shards_change_through_the_embed_flow(harness, tmp_path: Path, kind: str) -> None:
    """The same through real flow runs for the other image sources: a file list that names one more file,
    a tar shard rewritten with one more member: a new embed key, one image embedded, the rest reused, and
    the run's `embed-changes` artifact says so."""
    from tests.embed.test_source_changes import write_tar

    recs = demo_source().records[::97][:9]
    folder = tmp_path / "images"
    folder.mkdir()
    names = []
    for rec in recs:
        shutil.copy(rec.path, folder / Path(rec.path).name)
        names.append(Path(rec.path).name)
    path = tmp_path / ("list.txt" if kind == "filelist" else "s-000.tar")

    def write(members: list[str]) -> None:
        if kind == "filelist":
            path.write_text("\n".join(str(folder / n) for n in members) + "\n")
        else:
            write_tar(path, folder, members)

    o = {**_overrides(tmp_path / "root", folder), "source.kind": kind, "source.path": str(path),
         "transform.enabled": False}  # no labels here: the embed flow alone
    write(names[:8])
    first, _ = _embed_flow(o)
    write(names)
    second, run_id = _embed_flow(o)
    assert second.key != first.key and second.metrics.n_images == 9
    table = {r["change"]: r for r in _embed_output(tmp_path, run_id)}
    assert (table["added"]["images"], table["changed"]["images"], table["removed"]["images"],
            table["reused"]["images"]) == (1, 0, 0, 8)

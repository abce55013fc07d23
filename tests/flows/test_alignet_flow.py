"""The end-to-end `alignet` flow under Prefect's test harness on a slice of the real demo data:
every stage runs, the dataset is in the official format, a rerun is fully cached, a changed
stage config recomputes only that stage and the ones after it, and the same seed gives
byte-identical files."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.testing.utilities import prefect_test_harness

from alignet_core.io import formats
from alignet_core.sample import versions
from flows.alignet import alignet

CHECKER = Path(__file__).resolve().parents[3] / "shared" / "tools" / "check_alignet_npz.py"
STAGE_TASKS = ("embed", "fit-transform", "cluster", "sample-shard", "publish-dataset", "distill", "evaluate")


def tiny(root: Path, **extra) -> dict:
    return {
        "root": str(root),
        "source.limit": 120,
        "human.proxy_n_triplets": 3000,
        "transform.epochs": 4,
        "cluster.k": 5,
        "sample.n_train": 1200,
        "sample.n_valid": 300,
        "sample.shard_size": 400,
        "sample.n_workers": 2,
        "distill.steps": 4,
        "distill.batch_triplets": 8,
        "distill.warmup_steps": 1,
        "distill.checkpoint_every": 2,
        "distill.n_eval": 200,
        "distill.image_size": 64,
        "evaluate.n_per_level": 200,
        **extra,
    }


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_states(flow_run_id) -> dict[str, set[str]]:
    """State names of every task run of a flow run and its subflow runs, by task name."""
    out: dict[str, set[str]] = {}
    with get_client(sync_client=True) as client:
        ids = [flow_run_id]
        subs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids += [r.id for r in subs]
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)))
    for r in runs:
        name = r.name.rsplit("-", 1)[0]
        out.setdefault(name, set()).add(r.state.name)
    return out


def _subflow_parameters(flow_run_id) -> dict[str, dict]:
    """The parameters of each subflow run of a flow run, by flow name, as the Prefect API holds them."""
    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        return {client.read_flow(r.flow_id).name: r.parameters for r in subs}


def _run(overrides: dict):
    state = alignet(overrides=overrides, return_state=True)
    assert state.is_completed(), state
    return state.result().model_dump(mode="json"), state.state_details.flow_run_id


def _digest(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.npz"))}


def _artifacts_of(flow_run_ids: list) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))


def _assert_monitoring(run_id, summary: dict) -> None:
    """What an operator opens: progress (count, time) of every long stage, the dataset's files and location on
    the top-level run, and a report with its pictures beside it."""
    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    everywhere = {a.key: a for a in _artifacts_of([run_id, *(r.id for r in subs)]) if a.key}
    assert everywhere["transform-progress"].description.startswith("transform apply: done, 120 rows in ")
    assert everywhere["cluster-progress"].description.startswith("k-means assign: done, 120 rows in ")
    assert re.match(r"sample: done, \d+ shards in \d+ s$", everywhere["sample-progress"].description)
    assert everywhere["evaluate-progress"].description.startswith("evaluate score: done, 4 models in ")

    top = {a.key: a for a in _artifacts_of([run_id]) if a.key}
    dataset = Path(summary["dataset"])
    assert top["dataset-location"].data == f"[{socket.gethostname()}:{dataset.resolve()}]({dataset.resolve().as_uri()})"
    manifest = json.loads((dataset.parent / "manifest.json").read_text())
    rows = {r["file"]: r for r in json.loads(top["dataset-files"].data)}
    assert set(rows) == set(manifest["files"])
    for name, row in rows.items():
        assert row["sha256"] == manifest["files"][name]["sha256"]
        assert row["location"].endswith(str((dataset.parent / manifest["files"][name]["path"]).resolve()))

    report_dir = Path(summary["report_dir"])
    text = (report_dir / "report.md").read_text()
    for name in ("transform-fit.png", "cluster-sizes.png", "student-accuracy.png", "student-loss.png"):
        assert f"](figures/{name})" in text, name
        assert (report_dir / "figures" / name).read_bytes().startswith(b"\x89PNG"), name


def test_pipeline_end_to_end_cache_and_determinism(harness, tmp_path):
    summary, run_id = _run(tiny(tmp_path / "a"))

    for key in ("transform_acc_before", "transform_acc_after", "cluster_nmi", "cluster_ari", "n_triplets",
                "student_acc_before", "student_acc_after", "student_proxy_acc_before", "student_proxy_acc_after",
                "student_proxy_ceiling", "student_test_fold",
                "stage_seconds"):
        assert summary[key] is not None, key
    assert set(summary["stage_seconds"]) == {"embed", "transform", "cluster", "sample", "distill", "evaluate"}
    assert summary["student_human_acc_after"] is None  # the demo's data are the proxy, never keyed human
    assert summary["student_test_fold"].startswith("held-out")
    # the headline: every model at every level and on the test-fold proxy triplets, with intervals
    assert set(summary["alignment"]) == {"teacher_raw", "teacher_aligned", "student_raw", "student_aligned"}
    for by_set in summary["alignment"].values():
        assert set(by_set) <= {"category_boundary", "sibling_boundary", "class_boundary", "proxy"} and "proxy" in by_set
        assert all(e["low"] <= e["value"] <= e["high"] for e in by_set.values() if e["n"])
    assert set(summary["alignment_changes"]) == {"teacher", "student"}
    assert summary["transform_heldout"]["transformed"]["unit"] == "objects"
    assert (Path(summary["report_dir"]) / "summary.json").exists()
    assert (Path(summary["report_dir"]) / "report.md").read_text().startswith("# AligNet")
    assert summary["images"] == 120 and summary["images_skipped"] == 0
    # progress an operator reads: the count and the time, not only a percentage
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["embed-progress",
                                                                                                 "distill-progress"])))
    descriptions = {a.key: a.description for a in arts}
    assert descriptions["embed-progress"].startswith("embed: done, 120 images in ")
    assert descriptions["distill-progress"].startswith("distill: done, 4 steps in ")
    _assert_monitoring(run_id, summary)

    dataset = Path(summary["dataset"])
    assert dataset.name == "uncertainty_distillation"
    files = sorted(p.name for p in dataset.glob("*.npz"))
    assert files == ["train_between_class.npz", "train_cluster_border_5.npz",
                     "valid_between_class.npz", "valid_cluster_border_5.npz"]
    for f in dataset.glob("*.npz"):
        if CHECKER.exists():
            res = subprocess.run([sys.executable, str(CHECKER), str(f)], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout
        split = formats.read_alignet_npz(str(f), n_images=120)
        assert split.n_reordered == 0 and len(split) > 0
    assert summary["n_triplets"] == sum(len(formats.read_alignet_npz(str(f))) for f in dataset.glob("*.npz"))
    first = _task_states(run_id)
    for name in STAGE_TASKS:
        assert first[name] == {"Completed"}, (name, first[name])
    # the Dask subflow gets the sampling plan alone: Prefect sends a flow's parameters with every task it
    # submits (and Dask tokenizes them), so the run context (the source's listing, the human data) must not
    # be one of them (at a million images it was ~100 MB per shard and the run was killed for memory)
    sampling = _subflow_parameters(run_id)["sample-triplets"]
    assert set(sampling) == {"sp"}, set(sampling)
    assert len(json.dumps(sampling)) < 20_000

    # second run, same config: every stage is a cache hit and the files are untouched. The version is
    # published, so no shard task runs and no Dask cluster is started or contacted: the address given
    # here (not in any key) answers nothing, and a run that tried it would fail
    before = _digest(summary["dataset"])
    pem = tmp_path / "unused.pem"  # the TLS files an outside scheduler needs: present, never read
    pem.write_text("not a certificate\n")
    dead = {"sample.dask_address": "tls://127.0.0.1:9", "sample.dask_tls_ca_file": str(pem),
            "sample.dask_tls_cert": str(pem), "sample.dask_tls_key": str(pem)}
    summary2, run_id2 = _run(tiny(tmp_path / "a", **dead))
    second = _task_states(run_id2)
    # a cached rerun's top-level run still shows where its dataset is
    assert {"dataset-files", "dataset-location"} <= {a.key for a in _artifacts_of([run_id2])}
    for name in STAGE_TASKS:
        if name != "sample-shard":
            assert second[name] == {"Cached"}, (name, second[name])
    assert "sample-shard" not in second
    assert summary2["stage_keys"] == summary["stage_keys"]
    assert _digest(summary2["dataset"]) == before
    # ... and lands on the same version: no duplicate is published, `latest` points at it
    listed = versions.list_versions(str(tmp_path / "a"), "demo")
    assert [r["version"] for r in listed] == [summary["dataset_version"]] and listed[0]["latest"]
    assert Path(listed[0]["path"]) == dataset.parent
    assert versions.verify(str(tmp_path / "a"), "demo") == []

    # a changed cluster setting recomputes cluster and everything after it, nothing before
    summary3, run_id3 = _run(tiny(tmp_path / "a", **{"cluster.k": 6}))
    third = _task_states(run_id3)
    assert third["embed"] == {"Cached"} and third["fit-transform"] == {"Cached"}
    for name in ("cluster", "sample-shard", "publish-dataset", "distill", "evaluate"):
        assert third[name] == {"Completed"}, (name, third[name])
    assert summary3["stage_keys"]["transform"] == summary["stage_keys"]["transform"]
    assert summary3["stage_keys"]["cluster"] != summary["stage_keys"]["cluster"]
    listed = versions.list_versions(str(tmp_path / "a"), "demo")
    assert len(listed) == 2 and versions.read_latest(str(tmp_path / "a"), "demo") == summary3["dataset_version"]

    # a fresh root with the same seed and config gives byte-identical dataset files
    summary4, _ = _run(tiny(tmp_path / "b", **{"distill.enabled": False}))
    assert _digest(summary4["dataset"]) == before


@pytest.mark.slow
def test_missing_outputs_are_recomputed_not_served_from_cache(harness, tmp_path):
    """A cache record must never point at deleted files: removing a stage's output reruns it."""
    import shutil

    overrides = tiny(tmp_path / "c", **{"distill.enabled": False})
    summary, _ = _run(overrides)
    cluster_dir = Path(summary["dataset"]).parents[3] / "stages" / "cluster"
    shutil.rmtree(cluster_dir)
    summary2, run_id = _run(overrides)
    states = _task_states(run_id)
    assert states["cluster"] == {"Completed"} and states["embed"] == {"Cached"}
    assert any(cluster_dir.iterdir())
    assert np.isclose(summary2["cluster_nmi"], summary["cluster_nmi"])


def test_a_stage_flow_runs_alone(harness, tmp_path):
    """`cluster` alone computes its inputs (embed, transform) and nothing after it."""
    from flows.stages import cluster_flow

    out = cluster_flow(overrides=tiny(tmp_path / "d"))
    assert out.stage == "cluster" and Path(out.artifact).exists()
    stages_dir = tmp_path / "d" / "stages"
    assert sorted(p.name for p in stages_dir.iterdir()) == ["cluster", "embed", "transform"]


@pytest.mark.slow
def test_distill_flow_runs_alone_on_an_existing_dataset_folder(harness, tmp_path):
    """The hand-off target: `distill` on a folder of official files, with no earlier stage."""
    import shutil

    from flows.stages import distill_flow

    summary, _ = _run(tiny(tmp_path / "e", **{"distill.enabled": False}))
    folder = tmp_path / "downloaded"
    shutil.copytree(summary["dataset"], folder)
    root = tmp_path / "fresh"
    state = distill_flow(overrides=tiny(root, **{"distill.dataset": str(folder), "distill.join": "filenames"}),
                         return_state=True)
    assert state.is_completed(), state
    out = state.result()
    assert out.stage == "distill" and out.metrics.dataset == str(folder)
    assert out.metrics.sampling == "cluster_border_5"
    assert set(out.metrics.acc_after) == {"cluster_border_5", "between_class"}
    assert sorted(p.name for p in (root / "stages").iterdir()) == ["distill"]
    states = _task_states(state.state_details.flow_run_id)
    assert set(states) == {"distill"}, states
    # the same task on two CPU ranks: it starts torchrun's gloo ranks as a child process and waits for them
    state = distill_flow(overrides=tiny(root, **{"distill.dataset": str(folder), "distill.join": "filenames",
                                                 "distill.devices": ["cpu", "cpu"]}), return_state=True)
    assert state.is_completed(), state
    two = state.result()
    assert two.key != out.key and two.metrics.steps == 4 and set(two.metrics.acc_after) == set(out.metrics.acc_after)
    assert json.loads((Path(two.artifact) / "train_log.json").read_text())["ranks"] == 2


def test_evaluate_alone_on_a_checkpoint_and_a_set_the_pipeline_did_not_make(harness, tmp_path, capsys):
    """`alignet evaluate` on a student folder trained elsewhere and a THINGS-format file of
    triplets (with probabilities) written by hand: only embed, transform and evaluate run."""
    import torch

    from alignet_core.config.distill import DistillConfig
    from alignet_core.distill.train import train_student
    from alignet_core.io import sources
    from flows.cli import main

    src = sources.subset(sources.demo_source(), 120)
    g = np.random.default_rng(0)
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(64)])
    idx, sims, _ = formats.order_by_similarity(idx, g.normal(size=(64, 3)).astype(np.float32))
    split = formats.AlignetTriplets(idx, src.ids()[idx], sims.astype(np.float32))
    student_cfg = DistillConfig(student="tf_efficientnet_lite0", head_dim=16, steps=2, batch_triplets=8,
                                warmup_steps=0, image_size=32)
    folder = tmp_path / "elsewhere" / "student"
    train_student(split, src, student_cfg, str(folder), torch.device("cpu"), seed=3)
    rows = np.stack([g.choice(len(src), 3, replace=False) for _ in range(150)])
    formats.write_things_triplets(str(tmp_path / "mine.txt"), rows)
    np.save(tmp_path / "mine.npy", g.dirichlet([2, 1, 1], size=150).astype(np.float32))
    root = tmp_path / "root"
    args = ["evaluate", "--root", str(root)]
    for k, v in {**tiny(root), "distill.head_dim": 16, "distill.image_size": 32, "evaluate.student": str(folder),
                 "evaluate.saliency_maps": "proxy", "evaluate.saliency_images": 6,
                 "evaluate.sets": json.dumps([{"name": "mine", "triplets": str(tmp_path / "mine.txt"),
                                               "probabilities": str(tmp_path / "mine.npy"), "paper_level": "global"}])}.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| model | category_boundary | sibling_boundary | class_boundary | proxy | mine |" in out
    assert "uncertainty vs the proxy's choice probabilities" in out and "not the AligNet paper's" in out
    assert sorted(p.name for p in (root / "stages").iterdir()) == ["embed", "evaluate", "transform"]
    m = json.loads(next((root / "stages" / "evaluate").glob("*/alignment.json")).read_text())
    assert set(m["scores"]) == {"teacher_raw", "teacher_aligned", "student_raw", "student_aligned"}
    mine = m["scores"]["student_aligned"]["mine"]
    assert mine["n"] == 150 and mine["unit"] == "triplets" and mine["low"] <= mine["value"] <= mine["high"]
    assert set(m["uncertainty"]["student_aligned"]) == {"proxy", "mine"}
    # the paper's Levels figure beside the set declared to be that data, and nowhere else
    assert set(m["reference"]) == {"mine"} and "36–57%" in m["reference"]["mine"]
    assert set(m["agreement"]["student_aligned"]) == {"mine"} and 0 <= m["agreement"]["student_aligned"]["mine"]["value"] <= 1
    assert m["heldout"]["student_aligned"].startswith("unknown") and m["heldout"]["teacher_raw"].startswith("held-out")
    assert (root / "stages" / "evaluate").glob("*/sets/mine.txt")
    # the "where" metric against the proxy maps, named a proxy, with a picture beside the metrics
    sal = m["saliency"]
    assert sal["n_images"] == 6 and "proxy" in sal["maps"] and "unknown here" in sal["images"]
    assert sal["before"]["spearman"]["low"] <= sal["before"]["spearman"]["value"] <= sal["before"]["spearman"]["high"]
    assert next((root / "stages" / "evaluate").glob("*/saliency.png")).read_bytes()[:4] == b"\x89PNG"


def test_too_many_skipped_images_fail_the_run_naming_the_count(harness, tmp_path, capsys):
    """A folder where 3 of 10 images cannot be decoded: `alignet embed` fails (exit 2) naming the count, the
    limit and the reasons, with the embeddings kept; raising `embed.max_skipped_fraction` reuses them (the
    store's chunks are not rewritten), and the summary's count reaches the report's line."""
    import shutil

    from alignet_core.embed.stage import EmbedMetrics, SkippedImage
    from alignet_core.io import sources
    from alignet_core.pipeline.report import RunSummary, _skipped_line
    from flows.cli import main

    folder = tmp_path / "images"
    for i, rec in enumerate(sources.demo_source().records[:7]):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / f"c{i % 2}" / Path(rec.path).name)
    (folder / "bad").mkdir()
    (folder / "bad" / "empty.png").write_bytes(b"")
    (folder / "bad" / "text.png").write_text("not a picture\n")
    (folder / "bad" / "text2.png").write_text("not a picture either\n")
    root = tmp_path / "root"
    args = ["embed", "--root", str(root), "--set", "source.kind=folder", "--set", f"source.path={folder}",
            "--set", "cluster.k=2", "--set", "transform.enabled=false", "--set", "embed.model=tf_efficientnet_lite0",
            "--set", "embed.batch_size=4", "--set", "embed.chunk_rows=4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: embed.max_skipped_fraction: 3 of 10 images (30.0%)")
    assert "more than the limit 1%" in err and "bad/" in err
    chunks = sorted((root / "stages" / "embed").glob("*/embeddings.zarr/embeddings/c/*/*"))
    assert chunks and (root / "stages" / "embed").glob("*/manifest.json")
    mtimes = [p.stat().st_mtime_ns for p in chunks]
    assert main([*args, "--set", "embed.max_skipped_fraction=0.5"]) == 0
    assert [p.stat().st_mtime_ns for p in chunks] == mtimes

    m = EmbedMetrics(n_images=10, n_valid=7, dim=4, seconds=1.0,
                     skipped=[SkippedImage(id=f"bad/{n}", path=f"/x/bad/{n}", reason=f"/x/bad/{n}: not a readable image")
                              for n in ("a.png", "b.png", "c.png")])
    assert m.skipped_reasons() == {"<file>: not a readable image": 3}
    line = _skipped_line(RunSummary.model_construct(images=10, images_skipped=3, skipped_reasons=m.skipped_reasons()))
    assert line.startswith("**Images: 10, 3 skipped (30.0%)**") and "3 × <file>: not a readable image" in line


def _stage_files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root/stages` (but the cache generation files): mtime and, for manifests, bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.name == "manifest.json" else b"")
            for p in sorted((root / "stages").rglob("*")) if p.is_file() and p.name != "cache-generation.json"}


@pytest.mark.slow
def test_a_moved_root_and_a_relative_root_reuse_every_stage(harness, tmp_path, monkeypatch):
    """`mv a b` and a run on b (given as a relative root), then b moved again and run from another
    working directory: every stage is reused from its manifest (no file under stages/ rewritten, no
    new file), nothing handed on names the old place, and the next run is all cache hits."""
    import shutil

    summary, _ = _run(tiny(tmp_path / "a"))
    before = _stage_files(tmp_path / "a")
    digest = _digest(summary["dataset"])
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    for where, cwd in (("b", tmp_path), ("b", tmp_path / "x")):
        if cwd != tmp_path:
            cwd.mkdir()
            shutil.move(tmp_path / "b", cwd / "b")
            monkeypatch.chdir(cwd)
        moved, run_id = _run(tiny(Path(where)))
        states = _task_states(run_id)
        for name in STAGE_TASKS:
            if name == "sample-shard":  # the version is published: no shard task runs at all
                assert name not in states, states[name]
                continue
            assert states[name] == {"Completed"}, (name, states[name])  # a new place: no record of the old one
        assert _stage_files(cwd / "b") == before  # ... and every stage reused, nothing recomputed
        assert Path(moved["dataset"]).resolve().is_relative_to(cwd / "b") and _digest(moved["dataset"]) == digest
        assert str(tmp_path / "a") not in json.dumps(moved)
        # the stage manifests name paths under the root as "<root>/...": a reuse hands on the new place
        assert not [p for p in (cwd / "b" / "stages").rglob("manifest.json") if str(tmp_path / "a") in p.read_text()]
        assert versions.verify(where, "demo") == []
    again, run_id = _run(tiny(Path("b")))
    states = _task_states(run_id)
    assert all(states[name] == {"Cached"} for name in STAGE_TASKS if name != "sample-shard")
    assert "sample-shard" not in states

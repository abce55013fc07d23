"""Stage 4 as the pipeline runs it: on a foreign folder of official-format files joined to the
image source by filenames, scored against the teacher and on held-out (proxy) human triplets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from alignet_core.config import parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.distill.stage import distill_files, plan_distill, run_distill
from alignet_core.errors import InputError
from alignet_core.hardware import resolve_device
from alignet_core.human.data import human_test_split
from alignet_core.io import formats, sources, store
from alignet_core.models.embedding import embed_images
from alignet_core.models.student import LOG_FILE, STUDENT_FILE, load_student
from alignet_core.stats.metrics import odd_one_out_accuracy

REPO = Path(__file__).resolve().parents[2]


def _write_split(path: Path, src: sources.ImageSource, n: int, seed: int) -> None:
    """Random triplets ordered by a fixed pixel-free teacher (id hash), with foreign indices."""
    g = np.random.default_rng(seed)
    emb = g.normal(size=(len(src), 8))
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(n)])
    a, b, c = emb[idx[:, 0]], emb[idx[:, 1]], emb[idx[:, 2]]
    sims = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    idx, sims, _ = formats.order_by_similarity(idx, sims)
    names = src.ids()[idx]
    formats.write_alignet_npz(str(path), idx + 5000, names, sims.astype(np.float32))  # indices of another pool


@pytest.fixture()
def cfg(tmp_path):
    base = parse_config({})
    src = sources.subset(sources.demo_source(), 80)
    folder = tmp_path / "foreign"
    folder.mkdir()
    _write_split(folder / "train_mine.npz", src, 300, 0)
    _write_split(folder / "valid_mine.npz", src, 60, 1)
    _write_split(folder / "valid_other.npz", src, 40, 2)
    return with_overrides(base, {
        "root": str(tmp_path / "root"), "source.limit": 80, "human.proxy_n_triplets": 500,
        "distill.student": "resnet10t", "distill.weights": None, "distill.head_dim": 16, "distill.steps": 3,
        "distill.batch_triplets": 8, "distill.warmup_steps": 1, "distill.image_size": 32,
        "distill.dataset": str(folder), "distill.sampling": "mine", "distill.join": "filenames",
        "distill.cache_images": True,
    })


def test_distill_stage_on_a_foreign_folder_scores_teacher_and_human_triplets(cfg):
    out = run_distill(RunContext.of(cfg), None)
    m = out.metrics.model_dump()
    assert m["sampling"] == "mine" and m["n_train"] == 300 and m["steps"] == 3
    assert set(m["acc_before"]) == set(m["acc_after"]) == {"mine", "other"}
    src = sources.source_from_config(cfg.source)
    test = human_test_split(RunContext.of(cfg, src).human)
    assert m["n_human_test"] == len(test.triplets) == 100 and m["human_data"].startswith("taxonomy proxy")
    # every figure with its interval; the human one resamples the test fold's objects
    h = out.metrics.human
    assert h.before.unit == h.after.unit == h.change.unit == "objects" and h.after.value == m["human_acc_after"]
    assert h.after.low <= h.after.value <= h.after.high
    assert h.change.value == pytest.approx(h.after.value - h.before.value)
    assert out.metrics.heldout["mine"].before.unit == "triplets" and out.metrics.heldout["mine"].after.n == 60
    assert "cosine" in out.metrics.before_protocol and set(out.metrics.heldout_before_dot) == {"mine", "other"}
    for k in ("human_acc_before", "human_acc_after"):
        assert 0.0 <= m[k] <= 1.0
    assert (Path(out.artifact) / STUDENT_FILE).exists()

    # the human score is the odd-one-out accuracy of the trained student's embeddings
    student = load_student(out.artifact, cfg.distill)
    emb = embed_images(student, src.paths(), resolve_device("cpu"))
    assert m["human_acc_after"] == pytest.approx(odd_one_out_accuracy(emb, test.triplets), abs=1e-6)

    # rerun: the finished stage is reused; a changed input file makes a new key
    assert run_distill(RunContext.of(cfg), None).key == out.key
    files = distill_files(cfg, None)
    os.utime(files.train, (1, 1))
    assert distill_files(cfg, None).key != files.key


def test_distill_stage_names_a_missing_training_file(cfg):
    cfg = with_overrides(cfg, {"distill.sampling": "cluster_border_500"})
    with pytest.raises(InputError, match=r"train_cluster_border_500.npz.*does not exist.*train_mine.npz"):
        run_distill(RunContext.of(cfg), None)
    assert not store.exists(store.join(cfg.root, "stages", "distill"))


def test_distill_stage_on_two_cpu_ranks(cfg):
    """`distill.devices: [cpu, cpu]`: the stage starts two gloo ranks under torchrun, reports every step,
    evaluates once here and keys the output by the rank count (not by which devices)."""
    two = with_overrides(cfg, {"distill.devices": ["cpu", "cpu"]})
    steps = []
    out = run_distill(RunContext.of(two), None, lambda s, loss: steps.append(s))
    assert steps == [1, 2, 3]
    m = out.metrics
    assert m.steps == 3 and m.n_train == 300 and set(m.acc_after) == {"mine", "other"}
    assert 0.0 <= m.human_acc_after <= 1.0
    assert json.loads((Path(out.artifact) / LOG_FILE).read_text())["ranks"] == 2
    assert store.is_complete(out.dir)
    files = distill_files(cfg, None)
    one = plan_distill(cfg, files).key
    assert out.key != one  # 2 ranks round differently from 1: two outputs
    assert plan_distill(with_overrides(cfg, {"distill.devices": ["cpu"]}), files).key == one  # 1 rank, named or not
    assert run_distill(RunContext.of(two), None).key == out.key  # reused: no second launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_started_by_torchrun_then_evaluated_once(cfg, tmp_path):
    """The cluster recipe on one machine: two torchrun agents (`--nnodes 2`, c10d rendezvous), one CPU rank
    each, run `python -m alignet_core.distill -c my.yaml`; rank 0 then finishes the stage. The output's key is
    that of any 2-rank run, so the same config on one node with two devices reuses it."""
    nodes = with_overrides(cfg, {"distill.devices": ["cpu"], "distill.nodes": 2})
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(nodes.model_dump(mode="json")))
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "alignet-test",
                                "-m", "alignet_core.distill", "-c", str(path)],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    plan = plan_distill(nodes, distill_files(nodes, None))
    assert store.is_complete(plan.dir)
    log_ = json.loads((Path(plan.dir) / LOG_FILE).read_text())
    assert log_["ranks"] == 2 and log_["steps"] == 3
    assert sum("distill: finished" in o for o in outputs) == 1  # evaluated once, by rank 0
    one_node = with_overrides(cfg, {"distill.devices": ["cpu", "cpu"]})
    assert plan_distill(one_node, distill_files(one_node, None)).key == plan.key
    assert run_distill(RunContext.of(one_node), None).metrics == run_distill(RunContext.of(nodes), None).metrics  # both reuse the manifest


def test_a_foreign_dataset_whose_filenames_disagree_is_refused_before_training(cfg, tmp_path):
    """Indices in range, but the files name other images (the release's image order is not the source's):
    joined by indices, the stage refuses before building or training anything."""
    src = sources.source_from_config(cfg.source)
    folder = tmp_path / "reordered"
    folder.mkdir()
    g = np.random.default_rng(3)
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(40)])
    other = src.ids()[g.permutation(len(src))]
    sims = np.tile(np.float32([3.0, 1.0, 0.0]), (40, 1))
    formats.write_alignet_npz(str(folder / "train_mine.npz"), idx, other[idx], sims)
    bad = with_overrides(cfg, {"distill.dataset": str(folder), "distill.join": "indices"})
    with pytest.raises(InputError, match=r"train_mine.npz: \d+ of 120 filenames disagree with the source's images"):
        run_distill(RunContext.of(bad), None)
    assert not list((tmp_path / "root").rglob("student.safetensors")) and not list((tmp_path / "root").rglob("step_*"))

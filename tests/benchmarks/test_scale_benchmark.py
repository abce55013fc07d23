"""The scale benchmark: its generator (deterministic, chunk-independent, a known structure), its slope fit,
and (slow) its quick path end to end through `alignet run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignet_core.io import formats
from benchmarks import scale, scale_data
from benchmarks.scale_data import ScaleSpec

SMALL = ScaleSpec(n=20_000, dim=32, groups=20, supers=4, n_objects=40, images_per_object=3, n_triplets=500)


def test_rows_do_not_depend_on_chunks_or_n(tmp_path: Path) -> None:
    a = scale_data.write_embeddings(SMALL, tmp_path / "a", chunk_rows=3001)["embeddings"]
    b = scale_data.write_embeddings(SMALL, tmp_path / "b", chunk_rows=20_000)["embeddings"]
    assert Path(a).read_bytes() == Path(b).read_bytes()
    x = np.load(a, mmap_mode="r")
    assert x.shape == (20_000, 32) and x.dtype == np.float16
    # any row range, and the first rows of a larger n, are the same rows
    np.testing.assert_array_equal(scale_data.rows(SMALL, 8000, 8300), x[8000:8300])
    bigger = ScaleSpec(**{**SMALL.__dict__, "n": 30_000})
    np.testing.assert_array_equal(scale_data.rows(bigger, 0, 20_000), x[:])
    # another seed, other rows
    assert not np.array_equal(scale_data.rows(ScaleSpec(**{**SMALL.__dict__, "seed": 1}), 0, 100), x[:100])


def test_labels_and_ids_follow_the_rows(tmp_path: Path) -> None:
    paths = scale_data.write_embeddings(SMALL, tmp_path)
    labels = paths["labels"].read_text().split()
    ids = paths["ids"].read_text().split()
    assert len(labels) == len(ids) == SMALL.n and len(set(ids)) == SMALL.n
    groups = scale_data.group_labels(SMALL)
    assert labels[:3] == [f"g{g:03d}" for g in groups[:3]]
    # rows sit nearest their own group's centre: the structure k-means should recover
    x = np.load(paths["embeddings"]).astype(np.float32)[:2000]
    c = scale_data.teacher_centers(SMALL)
    nearest = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == groups[:2000]).mean() > 0.8  # chance: 1/20 (at 1,280 dims: 1.0)
    # a second call with the same spec reuses the files
    mtime = paths["embeddings"].stat().st_mtime_ns
    scale_data.write_embeddings(SMALL, tmp_path)
    assert paths["embeddings"].stat().st_mtime_ns == mtime


def test_human_triplets_follow_the_rule(tmp_path: Path) -> None:
    labels = scale_data.group_labels(SMALL)
    paths = scale_data.write_human(SMALL, tmp_path, labels)
    trip = formats.read_things_triplets(str(paths["triplets"]), SMALL.n_objects)
    probs = formats.read_probabilities(str(paths["probabilities"]), len(trip))
    assert trip.shape == (SMALL.n_triplets, 3) and (trip[:, 0] != trip[:, 1]).all() and (trip[:, 2] != trip[:, 0]).all()
    # the chosen pair comes first; with the rule's probabilities it is the likeliest pair more often than chance
    assert (probs.argmax(1) == 0).mean() > 0.5
    again, _ = scale_data.human_triplets(SMALL)
    np.testing.assert_array_equal(again, trip)
    # each object's images belong to one group (object o shows group o mod groups)
    table = np.loadtxt(paths["objects"], delimiter=",", skiprows=1, dtype=str)
    rows = np.array([int(i[len("img_"):]) for i in table[:, 1]])
    objects = table[:, 0].astype(int)
    assert (labels[rows] == objects % SMALL.groups).all()


def test_too_few_rows_per_group_is_refused() -> None:
    spec = ScaleSpec(n=100, dim=8, groups=20, supers=4, n_objects=40, images_per_object=3)
    with pytest.raises(ValueError, match="too few"):
        scale_data.object_images(spec, scale_data.group_labels(spec))


def test_slope_fit() -> None:
    ns = [250_000, 500_000, 1_000_000]
    linear = scale.fit_slopes(ns, [5 + 40e-6 * n for n in ns])
    assert linear["per_million"] == pytest.approx(40.0) and linear["intercept"] == pytest.approx(5.0)
    assert 0.7 < linear["loglog_exponent"] < 1.0  # an intercept bends the log-log line below 1 (0.79 here)
    quadratic = scale.fit_slopes(ns, [1e-10 * n * n for n in ns])
    assert quadratic["loglog_exponent"] == pytest.approx(2.0)
    assert scale.fit_slopes([1000], [3.0])["per_million"] is None


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    """`python -m benchmarks.scale --quick`: the real `alignet run` on 20k rows, twice, then verify."""
    out = tmp_path / "scale_quick.json"
    scale.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["n"] == scale.QUICK_SIZE and run["verified"]
    assert run["n_triplets_published"] == 2 * (scale.QUICK_TRIPLETS_PER_STRATEGY + scale.N_VALID)
    assert set(run["stages"]) >= {"embed", "transform", "cluster", "sample", "publish", "verify"}
    assert all(s["seconds"] >= 0 for s in run["stages"].values())
    # the published version's files are found where the manifest's "<root>/..." path says
    assert run["stages"]["publish"]["bytes_on_disk"] > 0
    assert len(run["transform_epochs"]["folds"]) == 5 and run["transform_epochs"]["refit"] >= 1
    assert run["cached_rerun_s"] < run["first_run_s"]
    assert run["cluster_recovery_ari"] > 0.5

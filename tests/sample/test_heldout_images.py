"""Issue 30: the student never trains on held-out images. On a real small run (the demo's images, the
taxonomy proxy's folds, a real k-means, the real sampler and a real distillation), no image of a
test-fold object appears in any sampled triplet under `human.teacher: heldout`, nor in any of the
student's training batches; under `all` the pool is whole and the student's figure says it is not
held-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignet_core.cluster.stage import run_cluster
from alignet_core.config import parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.distill.batches import TripletBatches
from alignet_core.distill.stage import run_distill
from alignet_core.human.heldout import NOT_HELD_OUT_ALL, excluded_images, heldout_label, images_in_test_fold
from alignet_core.io import embedding_store, store
from alignet_core.io.dataset_splits import read_split
from alignet_core.sample.stage import run_sample
from alignet_core.transform.stage import TransformMetrics, TransformOutput


def _config(root: Path, teacher: str):
    return with_overrides(parse_config({}), {
        "root": str(root), "source.limit": 80, "human.teacher": teacher, "human.proxy_n_triplets": 500,
        "cluster.k": 4, "sample.n_train": 400, "sample.n_valid": 80, "sample.shard_size": 200,
        "sample.strategies": ["cluster_border", "between_class", "class_border"],
        "distill.strategy": "cluster_border", "distill.student": "resnet10t", "distill.weights": None,
        "distill.head_dim": 16, "distill.steps": 6, "distill.batch_triplets": 16, "distill.warmup_steps": 1,
        "distill.image_size": 32, "distill.cache_images": True, "distill.n_eval": 40,
    })


def _transform_store(ctx: RunContext, root: Path) -> TransformOutput:
    """A transformed store (random rows): which rows the teacher's similarities come from does not decide
    which images are eligible, the test fold does."""
    url = store.join(str(root), "stages", "transform", "k0", "transformed.zarr")
    n = len(ctx.source)
    g = embedding_store.create_embedding_store(url, n, 8, ctx.source.ids(), "float32", 16, {})
    g["embeddings"][:] = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    g["valid"][:] = True
    return TransformOutput(stage="transform", key=f"k0-{ctx.cfg.human.teacher}",
                           dir=store.join(str(root), "stages", "transform", "k0"), artifact=url,
                           metrics=TransformMetrics(enabled=True, seconds=0.0))


def _sampled_rows(ctx: RunContext, folder: str) -> dict[str, np.ndarray]:
    return {p.name: read_split(str(p), ctx.source, "indices").indices for p in sorted(Path(folder).glob("*.npz"))}


@pytest.mark.usefixtures("one_torch_thread")
def test_no_test_fold_image_in_any_sampled_triplet_nor_training_batch(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "root", "heldout")
    ctx = RunContext.of(cfg)
    test_images = images_in_test_fold(cfg, ctx.human)
    # the proxy's objects are the images: the test fold is a fifth of them, and what the sampler leaves out
    assert 8 <= len(test_images) <= 32
    assert np.array_equal(excluded_images(cfg, ctx.human), test_images)
    assert (ctx.human.fold_of[ctx.human.object_of_image[test_images]] == cfg.human.test_fold).all()

    tfm = _transform_store(ctx, tmp_path / "root")
    ds = run_sample(ctx, tfm, run_cluster(ctx, tfm))
    files = _sampled_rows(ctx, ds.artifact)
    assert {f"{split}_{s}.npz" for split in ("train", "valid")
            for s in ("cluster_border_4", "between_class", "class_border")} == set(files)
    for name, rows in files.items():  # train and valid, every strategy
        assert len(rows) and not np.isin(rows, test_images).any(), name

    # the student's training batches: every micro-batch of every step of the real run's data
    train = read_split(str(Path(ds.artifact) / "train_cluster_border_4.npz"), ctx.source, "indices")
    batches = TripletBatches(train, ctx.source, lambda im: im, cfg.distill.batch_triplets, cfg.seed)
    seen = np.concatenate([batches.indices[batches.step_triplets(s)].ravel() for s in range(cfg.distill.steps)])
    assert not np.isin(seen, test_images).any()

    out = run_distill(ctx, ds)
    assert out.metrics.n_train == len(train) and out.metrics.human_is_proxy
    assert out.metrics.human_heldout.startswith("held-out")
    assert 0.5 < out.metrics.human_ceiling <= 1.0  # the proxy's noise ceiling, about 1 − proxy_noise
    assert out.metrics.human_ceiling == pytest.approx(1 - cfg.human.proxy_noise, abs=0.05)


def test_all_mode_samples_the_whole_pool_and_says_not_held_out(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "root", "all")
    ctx = RunContext.of(cfg)
    test_images = images_in_test_fold(cfg, ctx.human)
    assert len(excluded_images(cfg, ctx.human)) == 0
    tfm = _transform_store(ctx, tmp_path / "root")
    ds = run_sample(ctx, tfm, run_cluster(ctx, tfm))
    rows = np.concatenate([r.ravel() for r in _sampled_rows(ctx, ds.artifact).values()])
    assert np.isin(rows, test_images).any()  # the whole pool: test-fold images are drawn

    assert heldout_label(cfg, ctx.human, rows, own_dataset=True) == NOT_HELD_OUT_ALL
    held = with_overrides(cfg, {"human.teacher": "heldout"})
    assert heldout_label(held, ctx.human, rows, own_dataset=True).startswith("not held-out (")
    assert heldout_label(held, ctx.human, np.setdiff1d(rows, test_images), own_dataset=True).startswith("held-out")

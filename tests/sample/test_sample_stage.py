"""The sample stage's own numbers: a resumed stage reports the seconds of the attempt that finished it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from alignet_core.cluster.stage import run_cluster
from alignet_core.config import parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.io import embedding_store, store
from alignet_core.sample.stage import plan_sample, publish_sample, run_sample_shard
from alignet_core.transform.stage import TransformMetrics, TransformOutput


def test_a_resumed_sample_stage_reports_the_seconds_of_its_last_attempt(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    cfg = with_overrides(parse_config({}), {
        "root": root, "source.limit": 60, "cluster.k": 4, "sample.n_train": 300, "sample.n_valid": 60,
        "sample.shard_size": 120, "sample.strategies": ["cluster_border"],
    })
    ctx = RunContext.of(cfg)
    url = store.join(root, "stages", "transform", "k0", "transformed.zarr")
    g = embedding_store.create_embedding_store(url, len(ctx.source), 8, ctx.source.ids(), "float32", 16, {})
    g["embeddings"][:] = np.random.default_rng(0).normal(size=(len(ctx.source), 8)).astype(np.float32)
    g["valid"][:] = True
    tfm = TransformOutput(stage="transform", key="k0", dir=store.join(root, "stages", "transform", "k0"),
                          artifact=url, metrics=TransformMetrics(enabled=True, seconds=0.0))
    clu = run_cluster(ctx, tfm)
    first = plan_sample(ctx, tfm, clu)  # a first attempt: planned, one shard sampled, then killed
    run_sample_shard(first, first.specs[0])
    an_hour_ago = time.time() - 3600
    for path in [*first.groups_urls.values(), *(p for p in Path(first.plan.dir).rglob("*") if p.is_file())]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    resumed = plan_sample(RunContext.of(cfg), tfm, clu)  # the attempt that finishes it, an hour later
    for spec in resumed.specs:
        run_sample_shard(resumed, spec)
    out = publish_sample(RunContext.of(cfg), resumed)
    assert 0 < out.metrics.seconds < 600, out.metrics.seconds

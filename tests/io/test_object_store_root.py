"""A data root that is an fsspec URL, not a local path (here `memory://`, the in-process object
store fsspec ships): clustering, sampling shards, publication of a dataset version, `latest` and
checksum verification all work through the same code as on disk."""

from __future__ import annotations

import uuid

import numpy as np

from alignet_core.cluster.stage import run_cluster
from alignet_core.config import parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.io import embedding_store, formats, sources, store
from alignet_core.sample import versions
from alignet_core.sample.stage import plan_sample, promote_dataset, publish_sample, run_sample_shard
from alignet_core.transform.stage import TransformMetrics, TransformOutput


def test_cluster_sample_publish_and_verify_on_an_object_store_root():
    root = f"memory://alignet-{uuid.uuid4().hex}"
    cfg = with_overrides(parse_config({}), {
        "root": root, "source.limit": 60, "cluster.k": 4, "sample.n_train": 300, "sample.n_valid": 60,
        "sample.shard_size": 120, "sample.strategies": ["cluster_border", "between_class"],
    })
    src = sources.source_from_config(cfg.source)
    # a transformed store as stage 1 leaves it, written to the object store
    url = store.join(root, "stages", "transform", "k0", "transformed.zarr")
    g = embedding_store.create_embedding_store(url, len(src), 8, src.ids(), "float32", 16, {})
    g["embeddings"][:] = np.random.default_rng(0).normal(size=(len(src), 8)).astype(np.float32)
    g["valid"][:] = True
    tfm = TransformOutput(stage="transform", key="k0", dir=store.join(root, "stages", "transform", "k0"),
                          artifact=url, metrics=TransformMetrics(enabled=True, seconds=0.0))

    clu = run_cluster(RunContext.of(cfg), tfm)
    assert clu.artifact.startswith(root) and sum(clu.metrics.sizes) == 60
    sp = plan_sample(RunContext.of(cfg), tfm, clu)
    for spec in sp.specs:
        run_sample_shard(sp, spec)
    ds = publish_sample(RunContext.of(cfg), sp)
    info = promote_dataset(cfg, ds)

    assert ds.artifact == store.join(root, "datasets", "demo", info.version, "uncertainty_distillation")
    assert versions.read_latest(root, "demo") == info.version
    assert versions.verify(root, "demo") == []
    split = formats.read_alignet_npz(store.join(ds.artifact, "train_cluster_border_4.npz"), len(src))
    assert len(split) > 250 and split.n_reordered == 0
    # a rerun reuses the stage and the published version
    assert publish_sample(RunContext.of(cfg), plan_sample(RunContext.of(cfg), tfm, run_cluster(RunContext.of(cfg), tfm))).key == ds.key
    assert [r["version"] for r in versions.list_versions(root, "demo")] == [info.version]

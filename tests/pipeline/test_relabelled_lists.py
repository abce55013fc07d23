"""A CSV file list's labels are part of the keys of the stages that read them (the taxonomy proxy of the
transform, cluster agreement, class-based sampling, the evaluation's taxonomy levels), not of the embed key:
an edited label keeps the embeddings and makes those stages anew; the list rewritten with the same labels
(a new mtime) changes no key. Real stages (timm's `test_resnet`, the proxy transform, FAISS k-means) on
generated images."""

from __future__ import annotations

import csv
import io
import os
import tarfile
from pathlib import Path
from typing import Any

from alignet_core.cluster.stage import plan_cluster, run_cluster
from alignet_core.config import PipelineConfig, parse_config
from alignet_core.context import RunContext
from alignet_core.embed.stage import run_embed
from alignet_core.evaluate.stage import plan_evaluate
from alignet_core.io import sources
from alignet_core.io.listing import listing_of
from alignet_core.sample.stage import plan_sample
from alignet_core.transform.stage import plan_transform, run_transform
from tests.generated_images import write_jpeg_folder

SETTINGS: dict[str, Any] = {
    "device": "cpu", "seed": 1,
    "embed": {"model": "test_resnet", "weights": None, "batch_size": 8, "chunk_rows": 8},
    "human": {"proxy_n_triplets": 1500},
    "transform": {"epochs": 2, "chunk_rows": 8, "batch_size": 256, "local_batch": 16, "patience": 5},
    "cluster": {"k": 3, "chunk_rows": 16},
    "sample": {"strategies": ["between_class"], "n_train": 60, "n_valid": 12, "shard_size": 40},
    "distill": {"enabled": False},
}


def _write_list(path: Path, ids: list[str], fine: list[str]) -> None:
    """The CSV list: path, category (coarse) and subcategory (fine) of each image."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "subcategory"])
        for i, sub in zip(ids, fine):
            w.writerow([i, "animal" if sub in ("class0", "class1") else "object", sub])


def _cfg(root: Path, listing: Path) -> PipelineConfig:
    return parse_config({**SETTINGS, "root": str(root), "source": {
        "kind": "filelist", "path": str(listing), "label_columns": ["category", "subcategory"]}})


def test_an_edited_label_is_a_new_key_for_the_stages_that_read_labels_only(tmp_path: Path, one_torch_thread) -> None:
    folder = tmp_path / "images"
    ids = write_jpeg_folder(folder, 24, size=(40, 64))
    fine = [i.split("/")[0] for i in ids]
    listing = folder / "images.csv"
    _write_list(listing, ids, fine)
    cfg = _cfg(tmp_path / "root", listing)
    ctx = RunContext.of(cfg)
    emb = run_embed(ctx)
    tfm = run_transform(ctx, emb)
    assert tfm.metrics.enabled
    clu = run_cluster(ctx, tfm)

    def keys(cfg: PipelineConfig) -> dict[str, str]:
        """Every stage's key under `cfg`, the later ones planned on the first run's outputs (so a change
        is each stage's own, not only its input's)."""
        ctx = RunContext.of(cfg)
        e = run_embed(ctx)  # the first run's store, reused (or, were the key new, the images embedded again)
        return {"embed": e.key, "embed_dir": e.dir, "transform": plan_transform(cfg, e).key,
                "cluster": plan_cluster(cfg, tfm).key, "sample": plan_sample(ctx, tfm, clu).plan.key,
                "evaluate": plan_evaluate(cfg, e, tfm, None).key}

    first = keys(cfg)
    assert (first["embed"], first["transform"], first["cluster"]) == (emb.key, tfm.key, clu.key)

    stamp = listing.stat().st_mtime_ns
    _write_list(listing, ids, ["class1"] + fine[1:])  # one image relabelled, the images untouched
    relabelled = keys(cfg)
    assert (relabelled["embed"], relabelled["embed_dir"]) == (first["embed"], first["embed_dir"])  # no re-embedding
    for stage in ("transform", "cluster", "sample", "evaluate"):
        assert relabelled[stage] != first[stage], stage

    _write_list(listing, ids, fine)  # the same labels again, a later mtime: nothing changed for any stage
    os.utime(listing, ns=(stamp + 10**9, stamp + 10**9))
    assert keys(cfg) == first


def test_which_sources_carry_a_labels_identity(tmp_path: Path) -> None:
    """A class folder's name is the first folder of each image's id, a tar label a member of its shard: their
    labels are in the embed key's listing, so no stage key carries them again; a list without labels carries
    none either. Imported rows joined to a CSV list without a labels file of their own take its labels."""
    write_jpeg_folder(tmp_path / "images", 3, size=(40, 64))
    folder = parse_config({"source": {"kind": "folder", "path": str(tmp_path / "images")}}).source
    assert sources.labels_identity(folder) is None and sources.labels_entry(folder) == {}
    plain = tmp_path / "images" / "list.txt"
    plain.write_text("class0/00000.jpg\nclass1/00001.jpg\nclass2/00002.jpg\n")
    unlabelled = parse_config({"source": {"kind": "filelist", "path": str(plain)}}).source
    assert sources.labels_identity(unlabelled) is None  # a list without labels keeps its keys as they were

    shard = tmp_path / "shard-000.tar"
    jpeg = (tmp_path / "images" / "class0" / "00000.jpg").read_bytes()

    def write_shard(label: bytes, mtime_ns: int) -> str:
        with tarfile.open(shard, "w") as tf:
            for name, data in (("0001.jpg", jpeg), ("0001.cls", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        os.utime(shard, ns=(mtime_ns, mtime_ns))
        tar = parse_config({"source": {"kind": "tar", "path": str(shard)}}).source
        assert sources.labels_identity(tar) is None
        return listing_of(sources.source_from_config(tar)).key

    assert write_shard(b"cat", 10**18) != write_shard(b"dog", 10**18 + 10**9)  # a relabelled member: a new listing

    labelled = tmp_path / "images" / "list.csv"
    _write_list(labelled, ["class0/00000.jpg", "class1/00001.jpg", "class2/00002.jpg"], ["class0", "class1", "class2"])
    images = {"kind": "filelist", "path": str(labelled), "label_columns": ["category", "subcategory"]}
    own = sources.labels_identity(parse_config({"source": images}).source)
    assert own is not None
    joined = {"kind": "embeddings", "path": str(tmp_path / "rows.npy"), "images": images}
    assert sources.labels_identity(parse_config({"source": joined}).source) == own  # the rows take the list's labels
    with_file = {**joined, "labels": str(tmp_path / "labels.txt")}  # hashed by source_identity (the embed key)
    assert sources.labels_identity(parse_config({"source": with_file}).source) is None

"""Bad inputs: broken images are skipped and reported; bad sources, embeddings, triplet, probability,
object and `.npz` files are rejected with an error naming the file and what is wrong, and where the
pipeline can see the problem up front (`preflight`), before any work."""

from __future__ import annotations

import io
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import zarr

from alignet_core.cluster import kmeans as cluster  # RENAME
from alignet_core.config.cluster import ClusterConfig
from alignet_core.config import parse_config
from alignet_core.context import RunContext
from alignet_core.embed.stage import EmbedMetrics, EmbedOutput, run_embed
from alignet_core.errors import InputError
from alignet_core.io import embedding_store, formats
from alignet_core.io.images import load_image
from alignet_core.io.sources import demo_source, filelist_source, source_from_config, tar_source
from alignet_core.pipeline.preflight import preflight
from alignet_core.transform import affine
from alignet_core.transform.stage import run_transform

EMBED = {"model": "test_resnet", "weights": None, "batch_size": 4, "chunk_rows": 4}


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels (its data is a few bytes): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real demo images in two class folders."""
    base = tmp_path_factory.mktemp("good")
    for i, rec in enumerate(demo_source().records[::300][:6]):
        (base / f"c{i % 2}").mkdir(exist_ok=True)
        shutil.copy(rec.path, base / f"c{i % 2}" / Path(rec.path).name)
    return base


BROKEN = {  # file name → (bytes, a word the reported reason contains)
    "zero.png": (b"", "empty"),
    "truncated.png": (None, "truncated"),
    "text.png": (b"this is not a picture\n", "not a readable image"),
    "noise.jpg": (np.random.default_rng(0).bytes(3000), "not a readable image"),
    "huge.png": (huge_png_header(10_000, 10_000), "too large"),
}


def test_broken_images_are_skipped_and_reported_other_rows_unchanged(good: Path, tmp_path: Path,
                                                                      one_torch_thread: None) -> None:
    dirty = tmp_path / "dirty"
    shutil.copytree(good, dirty)
    png = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    for name, (data, _) in BROKEN.items():
        (dirty / "c0" / name).write_bytes(png.getvalue()[:300] if data is None else data)

    def run(folder: Path, root: Path):
        cfg = parse_config({"root": str(root), "device": "cpu", "source": {"kind": "folder", "path": str(folder)},
                            "embed": {**EMBED, "max_skipped_fraction": 1.0}, "transform": {"enabled": False}, "cluster": {"k": 2},
                            "distill": {"enabled": False}})
        preflight(cfg)
        return run_embed(RunContext.of(cfg))

    out, ref = run(dirty, tmp_path / "r1"), run(good, tmp_path / "r2")
    reported = {s.id: s.reason for s in out.metrics.skipped}
    assert set(reported) == {f"c0/{name}" for name in BROKEN}
    for name, (_, word) in BROKEN.items():
        assert word in reported[f"c0/{name}"] and name in reported[f"c0/{name}"]
    assert out.metrics.n_images == 11 and out.metrics.n_valid == 6

    g, r = zarr.open_group(out.artifact, mode="r"), zarr.open_group(ref.artifact, mode="r")
    ids, ref_ids = list(np.asarray(g["ids"][:])), list(np.asarray(r["ids"][:]))
    valid = np.asarray(g["valid"][:])
    assert [i for i, v in zip(ids, valid) if v] == ref_ids
    rows = [ids.index(i) for i in ref_ids]
    np.testing.assert_array_equal(np.asarray(g["embeddings"][:])[rows], np.asarray(r["embeddings"][:]))
    assert not np.asarray(g["embeddings"][:])[~valid].any()


def test_huge_image_is_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "huge.png").write_bytes(huge_png_header(10_000, 10_000))  # over PIL's limit, under 2x
    with pytest.raises(InputError, match="huge.png: image too large"):
        load_image(str(tmp_path / "huge.png"))


def test_empty_sources_and_duplicate_ids(tmp_path: Path, good: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("no images here")
    for folder in ("empty", "only-text"):
        cfg = parse_config({"source": {"kind": "folder", "path": str(tmp_path / folder)}})
        with pytest.raises(InputError, match=f"{folder}.*no images found"):
            source_from_config(cfg.source)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="empty.txt.*no images found"):
        filelist_source(str(tmp_path / "empty.txt"))
    shutil.copytree(good, tmp_path / "imgs")
    name = sorted(p.name for p in (tmp_path / "imgs" / "c0").iterdir())[0]
    (tmp_path / "imgs" / "list.txt").write_text(f"c0/{name}\nc0/./{name}\n")  # the same image twice
    with pytest.raises(InputError, match="duplicate image id"):
        filelist_source(str(tmp_path / "imgs" / "list.txt"))


def test_tar_member_pointing_outside_the_shard_is_refused(tmp_path: Path, good: Path) -> None:
    img = next((good / "c0").iterdir()).read_bytes()
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        info = tarfile.TarInfo("../../evil.png")
        info.size = len(img)
        tf.addfile(info, io.BytesIO(img))
    with pytest.raises(InputError, match=r"'\.\./\.\./evil\.png'.*outside the shard"):
        tar_source(str(tmp_path / "s.tar"))


# ----------------------------------------------------------------------------- NaN / inf embeddings
def _store(url: str, ids: np.ndarray, bad_row: int | None, value: float) -> str:
    x = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    if bad_row is not None:
        x[bad_row, 3] = value
    g = embedding_store.create_embedding_store(url, len(ids), 8, ids, "float32", 16, {})
    g["embeddings"][:] = x
    g["valid"][:] = True
    return url


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_rejected_naming_the_row(tmp_path: Path, value: float) -> None:
    ids = np.array([f"img{i:03d}" for i in range(60)])
    url = _store(str(tmp_path / "e.zarr"), ids, 37, value)
    with pytest.raises(InputError, match=r"NaN or inf, first row 37 \(id 'img037'\)"):
        cluster.run_kmeans(url, ClusterConfig(k=3), seed=0)
    # also in the assignment pass alone, for a row k-means never trained on
    with pytest.raises(InputError, match="first row 37"):
        cluster.assign_clusters(url, np.zeros((3, 8), np.float32), chunk_rows=16, spherical=False)


def test_transform_stage_rejects_non_finite_embeddings(tmp_path: Path, one_torch_thread: None) -> None:
    cfg = parse_config({"root": str(tmp_path / "root"), "device": "cpu", "source": {"limit": 40},
                        "human": {"proxy_n_triplets": 300}, "transform": {"epochs": 1}})
    ids = source_from_config(cfg.source).ids()
    url = _store(str(tmp_path / "e.zarr"), ids, 5, np.nan)
    emb = EmbedOutput(stage="embed", key="handmade", dir=str(tmp_path), artifact=url,
                      metrics=EmbedMetrics(n_images=len(ids), n_valid=len(ids), dim=8, skipped=[], seconds=0.0))
    with pytest.raises(InputError, match=rf"e.zarr: 1 valid embedding row.*row 5 \(id '{ids[5]}'\)"):
        run_transform(RunContext.of(cfg), emb)


def test_transform_and_store_of_different_widths(tmp_path: Path) -> None:
    ids = np.array([f"img{i}" for i in range(20)])
    url = _store(str(tmp_path / "e.zarr"), ids, None, 0.0)  # width 8
    tf = affine.AffineTransform(mean=0.0, std=1.0, weight=np.eye(6, dtype=np.float32), bias=np.zeros(6, np.float32))
    with pytest.raises(InputError, match="embeddings have dim 8, the transform expects 6"):
        affine.apply_transform_to_store(url, str(tmp_path / "t.zarr"), tf, 4, torch.device("cpu"))


# ----------------------------------------------------------------------------- human data, up front
def _human_cfg(good: Path, tmp_path: Path, **human: str | bool) -> object:
    if "objects" not in human:
        human["positional"] = True
    return parse_config({"root": str(tmp_path / "root"), "source": {"kind": "folder", "path": str(good)},
                         "cluster": {"k": 2}, "human": human})


@pytest.mark.parametrize(
    "content, message",
    [
        ("0 1 2\n3 4 9\n", r"object id out of range \[0, 6\) in line 2: \[3, 4, 9\]"),
        ("0 1 2\n4 4 5\n", "an object appears twice in line 2"),
        ("0 1 2\n0 -1 2\n", "negative object id in line 2"),
        ("0 1 2\n3 4\n", "line 2 has 2 fields, expected 3"),
        ("0 1 x\n", "line 1: object ids must be integers, got '0 1 x'"),
        # the line an editor shows, counting comments and blank lines
        ("# i j k\n\n0 1 2\n3 4 9\n", r"out of range \[0, 6\) in line 4"),
        ("# i j k\n0 1 2\n\n3 4\n", "line 4 has 2 fields"),
    ],
)
def test_bad_triplet_files_fail_in_preflight(content: str, message: str, good: Path, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(content)
    with pytest.raises(InputError, match=rf"human.triplets: .*t.txt.*{message}"):
        preflight(_human_cfg(good, tmp_path, triplets=str(tmp_path / "t.txt")))
    assert not (tmp_path / "root").exists()


def test_bad_probabilities_and_objects_fail_in_preflight(good: Path, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("0 1 2\n3 4 5\n")
    np.save(tmp_path / "p3.npy", np.full((3, 3), 1 / 3))
    with pytest.raises(InputError, match=r"human.probabilities: .*p3.npy: expected shape \(2, 3\)"):
        preflight(_human_cfg(good, tmp_path, triplets=str(tmp_path / "t.txt"),
                                    probabilities=str(tmp_path / "p3.npy")))
    np.save(tmp_path / "psum.npy", np.array([[0.9, 0.9, 0.1], [0.2, 0.3, 0.5]]))
    with pytest.raises(InputError, match="human.probabilities: .*sum to 1"):
        preflight(_human_cfg(good, tmp_path, triplets=str(tmp_path / "t.txt"),
                                    probabilities=str(tmp_path / "psum.npy")))
    (tmp_path / "objects.csv").write_text("object,image_id\n0,c0/nope.png\n")
    with pytest.raises(InputError, match="human.objects: .*objects.csv: no image_id is in the image source "
                                         r"\(e.g. line 2: image_id 'c0/nope.png' is not in"):
        preflight(_human_cfg(good, tmp_path, triplets=str(tmp_path / "t.txt"),
                                    objects=str(tmp_path / "objects.csv")))


# ----------------------------------------------------------------------------- official .npz files
def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


OK = {"indices": np.array([[0, 1, 2]]), "filenames": np.array([["a", "b", "c"]]),
      "similarities": np.array([[1.0, 0.5, 0.2]], np.float32)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"indices": np.array([[0, 1, 7]])}, r"out of range \[0, 5\) in row 0 \(0-based\)"),
        ({"filenames": np.array([[1, 2, 3]])}, "'filenames' must be strings"),
        ({"similarities": np.array([[3, 2, 1]])}, "'similarities' must be finite floats"),
        ({"similarities": np.array([[np.inf, 0.0, 0.0]])}, "'similarities' must be finite floats"),
        ({"indices": np.array([0, 1, 2])}, r"'indices' has shape \(3,\), expected \(3, 3\)"),
        ({"indices": np.array([[0.0, 1.0, 2.0]])}, "'indices' must be integers"),
        ({"label": np.zeros(1)}, "missing array"),
    ],
)
def test_malformed_official_npz_is_rejected(change: dict, message: str, tmp_path: Path) -> None:
    arrays = {**OK, **change}
    if "label" in change:
        arrays.pop("filenames")
    url = _npz(tmp_path / "x.npz", **arrays)
    with pytest.raises(InputError, match=message):
        formats.read_alignet_npz(url, n_images=5)


def test_npz_that_is_not_a_zip_or_is_cut_short_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(InputError, match="noise.npz: not a readable AligNet .npz file"):
        formats.read_alignet_npz(str(tmp_path / "noise.npz"))
    whole = Path(_npz(tmp_path / "whole.npz", **OK)).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cut.npz: not a readable AligNet .npz file"):
        formats.read_alignet_npz(str(tmp_path / "cut.npz"))

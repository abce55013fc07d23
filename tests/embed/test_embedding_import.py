"""Imported embeddings (`source.kind: embeddings`): every format read from real files into the embed
stage's store, the casting rule, the key, provenance, a resumed import, and every bad array refused
before any work with the field named."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from alignet_core.config import parse_config
from alignet_core.context import RunContext
from alignet_core.embed.stage import plan_embed, run_embed
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import sources
from alignet_core.pipeline.preflight import preflight
from tests.generated_embeddings import blobs

N, P = 90, 12


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own inspection cache (the on-disk one) and an empty in-process memo."""
    from alignet_core.io import embedding_sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(embedding_sources, "_MEMO", {})
    monkeypatch.setattr(sources, "_EMBEDDINGS_SOURCES", {})


def rows(dtype: str = "float32", n: int = N, p: int = P) -> np.ndarray:
    x, _ = blobs(n, 3, p, seed=1)
    return x.astype(dtype)


def write_ids(path: Path, n: int = N, prefix: str = "img") -> str:
    path.write_text("".join(f"{prefix}{i:04d}.jpg\n" for i in range(n)))
    return str(path)


def cfg_for(tmp_path: Path, path: str, ids: str | None, **source: Any) -> Any:
    embed = source.pop("embed", {})
    return parse_config({"root": str(tmp_path / "root"), "device": "cpu",
                         "source": {"kind": "embeddings", "path": path, **({"ids": ids} if ids else {}), **source},
                         "embed": {"chunk_rows": 16, **embed}, "cluster": {"k": 3}, "transform": {"enabled": False}})


def stored(out: Any) -> zarr.Group:
    return zarr.open_group(out.artifact, mode="r")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- formats
def _npy(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    np.save(tmp_path / "emb.npy", x)
    return str(tmp_path / "emb.npy"), write_ids(tmp_path / "ids.txt")


def _hdf5(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "emb.h5", "w") as f:
        f.create_dataset("features", data=x)
        f.create_dataset("other", data=np.zeros((3, 2)))
    return str(tmp_path / "emb.h5"), write_ids(tmp_path / "ids.txt")


def _zarr_array(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    z = zarr.create_array(str(tmp_path / "emb.zarr"), shape=x.shape, dtype=x.dtype, chunks=(7, P))
    z[:] = x
    return str(tmp_path / "emb.zarr"), write_ids(tmp_path / "ids.txt")


def _zarr_group(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    g = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    g.create_array("embeddings", shape=x.shape, dtype=x.dtype, chunks=(20, P))[:] = x
    g.create_array("norms", shape=(N,), dtype="float32")[:] = 1
    return str(tmp_path / "store.zarr"), write_ids(tmp_path / "ids.txt")


def _pt(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    import torch

    torch.save(torch.from_numpy(x), tmp_path / "emb.pt")
    return str(tmp_path / "emb.pt"), write_ids(tmp_path / "ids.txt")


def _pt_legacy(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    """torch's pre-zip format: cannot be memory-mapped, loaded whole."""
    import torch

    torch.save(torch.from_numpy(x), tmp_path / "emb.pt", _use_new_zipfile_serialization=False)
    return str(tmp_path / "emb.pt"), write_ids(tmp_path / "ids.txt")


def _pt_dict(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
    import torch

    torch.save({"embeddings": torch.from_numpy(x), "step": torch.tensor(3)}, tmp_path / "emb.pt")
    return str(tmp_path / "emb.pt"), write_ids(tmp_path / "ids.txt")


def _thingsvision(kind: str) -> Any:
    def write(tmp_path: Path, x: np.ndarray) -> tuple[str, str | None]:
        """A thingsvision output folder as its `save_features` and image dataset write it."""
        out = tmp_path / "features" / "resnet18" / "avgpool"
        out.mkdir(parents=True)
        write_ids(out / "file_names.txt", prefix="cats/")
        if kind == "npy":
            np.save(out / "features.npy", x)
        elif kind == "hdf5":
            h5py = pytest.importorskip("h5py")
            with h5py.File(out / "features.hdf5", "w") as f:
                f.create_dataset("features", data=x)
        else:
            import torch

            torch.save(torch.from_numpy(x), out / "features.pt")
        return str(out), None
    return write


FORMATS = {"npy": _npy, "hdf5": _hdf5, "zarr-array": _zarr_array, "zarr-group": _zarr_group, "pt": _pt,
           "pt-legacy": _pt_legacy, "pt-dict": _pt_dict, "thingsvision-npy": _thingsvision("npy"),
           "thingsvision-hdf5": _thingsvision("hdf5"), "thingsvision-pt": _thingsvision("pt")}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_imports_into_the_embed_store(tmp_path: Path, fmt: str) -> None:
    x = rows("float32")
    path, ids = FORMATS[fmt](tmp_path, x)
    cfg = cfg_for(tmp_path, path, ids)
    preflight(cfg)
    out = run_embed(RunContext.of(cfg))
    g = stored(out)
    np.testing.assert_array_equal(g["embeddings"][:], x)
    assert g["embeddings"].dtype == np.float32 and g["valid"][:].all()
    want_ids = [f"{'cats/' if fmt.startswith('thingsvision') else 'img'}{i:04d}.jpg" for i in range(N)]
    assert g["ids"][:].tolist() == want_ids
    imp = out.metrics.imported
    assert imp is not None and imp.shape == [N, P] and imp.dtype == "float32"
    assert out.metrics.n_images == N and out.metrics.n_valid == N and out.metrics.dim == P
    assert g.attrs["import"]["sha256"] == imp.sha256
    if Path(imp.path).is_file():  # a file's sha256 is its bytes' (a .npy's computed in the value scan)
        assert imp.sha256 == sha256(Path(imp.path))
    assert out.metrics.teacher("tf_efficientnet_lite2") == f"imported: {imp.path}"
    assert run_embed(RunContext.of(cfg)).key == out.key  # reused


def test_float16_stays_float16_and_widens_exactly(tmp_path: Path) -> None:
    x = rows("float16")
    path, ids = _npy(tmp_path, x)
    half = run_embed(RunContext.of(cfg_for(tmp_path, path, ids, embed={"store_dtype": "float16"})))
    full = run_embed(RunContext.of(cfg_for(tmp_path, path, ids, embed={"store_dtype": "float32"})))
    assert half.key != full.key
    assert stored(half)["embeddings"].dtype == np.float16
    assert stored(half)["embeddings"][:].tobytes() == x.tobytes()
    np.testing.assert_array_equal(stored(full)["embeddings"][:], x.astype(np.float32))


def test_the_key_follows_the_bytes_not_the_path(tmp_path: Path) -> None:
    """A copy elsewhere keeps the key (the sha256 identifies the data); changed rows or ids change it."""
    x = rows()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path_a, ids_a = _npy(tmp_path / "a", x)
    path_b, ids_b = _npy(tmp_path / "b", x)
    key = plan_embed(cfg_for(tmp_path, path_a, ids_a)).key
    assert plan_embed(cfg_for(tmp_path, path_b, ids_b)).key == key
    y = x.copy()
    y[5, 0] += 1
    np.save(path_b, y)
    assert plan_embed(cfg_for(tmp_path, path_b, ids_b)).key != key
    write_ids(Path(ids_a), prefix="other")
    assert plan_embed(cfg_for(tmp_path, path_a, ids_a)).key != key


def test_labels_and_an_image_source_joined_by_id(tmp_path: Path) -> None:
    """Labels come from the labels file; `source.images` gives each row its image (and, without a labels
    file, its class folder), and refuses ids it does not have."""
    from tests.generated_images import write_jpeg_folder

    write_jpeg_folder(tmp_path / "images", 12, seed=0, size=(40, 40))
    image_ids = sources.folder_source(str(tmp_path / "images")).ids().tolist()
    x = rows(n=len(image_ids))
    np.save(tmp_path / "emb.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(image_ids) + "\n")
    (tmp_path / "labels.txt").write_text("".join(f"l{i % 2}\n" for i in range(len(image_ids))))
    images = {"kind": "folder", "path": str(tmp_path / "images")}
    cfg = cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"), images=images)
    src = sources.source_from_config(cfg.source)
    assert [Path(p).exists() for p in src.paths()] == [True] * len(image_ids)
    assert src.labels().tolist() == [r.label for r in sources.folder_source(str(tmp_path / "images")).records]
    with_labels = cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"), images=images,
                          labels=str(tmp_path / "labels.txt"))
    assert sources.source_from_config(with_labels.source).labels().tolist() == [f"l{i % 2}" for i in range(len(image_ids))]
    assert sources.has_images(cfg.source)
    bare = cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"))
    assert not sources.has_images(bare.source)
    assert set(sources.source_from_config(bare.source).paths()) == {sources.NO_IMAGE}
    (tmp_path / "ids.txt").write_text("\n".join(["not/there.jpg"] + image_ids[1:]) + "\n")
    with pytest.raises(InputError, match=r"^source\.images: 1 of the 12 embedding ids .*not/there\.jpg"):
        preflight(cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"), images=images))


def test_an_interrupted_import_resumes_to_the_same_store(tmp_path: Path) -> None:
    """An import stopped by an exception after 2 of 6 chunks were marked (raised from its own progress
    callback, as a Ctrl-C would land; the other 4 were written in the same block but not marked) resumes,
    copying only the chunks not marked, to an uninterrupted import's bytes."""
    from tests.reliability.test_stage_kills import digests

    x = rows(n=96)
    path, ids = _npy(tmp_path, x)
    write_ids(Path(ids), n=96)
    ref = run_embed(RunContext.of(cfg_for(tmp_path / "ref", path, ids)))
    cfg = cfg_for(tmp_path / "cut", path, ids)
    calls: list[int] = []

    def stop_after_two(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(RunContext.of(cfg), progress=stop_after_two)
    marked = sorted(p.name for p in (Path(plan_embed(cfg).dir) / "embeddings.zarr" / "_progress").iterdir())
    assert marked == ["00000000.done", "00000001.done"]
    resumed: list[int] = []
    out = run_embed(RunContext.of(cfg), progress=lambda done, total: resumed.append(done))
    assert resumed == [48, 64, 80, 96]  # chunks 2..5 only
    assert out.key == ref.key
    assert digests(Path(out.artifact)) == digests(Path(ref.artifact))


# ----------------------------------------------------------------------------- bad arrays
def _bad(tmp_path: Path, case: str) -> tuple[dict[str, Any], str]:
    """(source/embed settings, the start of the expected message) for one bad input."""
    ids = write_ids(tmp_path / "ids.txt")
    npy = str(tmp_path / "emb.npy")
    x = rows()
    if case == "missing file":
        return {"path": str(tmp_path / "nope.npy"), "ids": ids}, "source.path: .*nope.npy' does not exist"
    if case == "unknown format":
        (tmp_path / "emb.csv").write_text("1,2\n")
        return {"path": str(tmp_path / "emb.csv"), "ids": ids}, "source.format: cannot tell the format"
    if case == "rank 3":
        np.save(npy, x.reshape(N, 3, 4))
        return {"path": npy, "ids": ids}, r"source.path: .* has shape \(90, 3, 4\), rank 3; expected a 2-d"
    if case == "rank 1":
        np.save(npy, x[:, 0])
        return {"path": npy, "ids": ids}, r"source.path: .* has shape \(90,\), rank 1"
    if case == "object dtype":
        np.save(npy, np.array([[1, "a"]] * N, dtype=object), allow_pickle=True)
        return {"path": npy, "ids": ids}, "source.path: .* holds Python objects"
    if case == "string dtype":
        np.save(npy, np.array([["a", "b"]] * N))
        return {"path": npy, "ids": ids}, "source.path: .* has dtype <U1; expected numbers"
    if case == "ids count":
        np.save(npy, x)
        return {"path": npy, "ids": write_ids(tmp_path / "ids.txt", n=N - 1)}, \
            "source.ids: .* has 89 ids for the 90 rows"
    if case == "duplicate ids":
        np.save(npy, x)
        (tmp_path / "ids.txt").write_text("".join(f"img{i % 80}\n" for i in range(N)))
        return {"path": npy, "ids": ids}, r"source.ids: .*: 10 duplicate id\(s\).*'img0' \(2×\)"
    if case == "labels count":
        np.save(npy, x)
        (tmp_path / "labels.txt").write_text("a\n" * 7)
        return {"path": npy, "ids": ids, "labels": str(tmp_path / "labels.txt")}, \
            "source.labels: .* has 7 lines for the 90 rows"
    if case == "NaN rows":
        x[[7, 40], 3] = np.nan
        np.save(npy, x)
        return {"path": npy, "ids": ids}, \
            r"source.path: .*: 2 row\(s\) hold NaN or infinite values, e.g. row\(s\) 7 \(id 'img0007.jpg'\), 40"
    if case == "infinite rows":
        x[11, 0] = -np.inf
        np.save(npy, x.astype(np.float16))
        return {"path": npy, "ids": ids}, r"source.path: .*: 1 row\(s\) hold NaN or infinite values, e.g. row\(s\) 11 "
    if case == "NaN in hdf5":
        h5py = pytest.importorskip("h5py")
        x[89, 1] = np.nan
        with h5py.File(tmp_path / "emb.h5", "w") as f:
            f.create_dataset("features", data=x, chunks=(8, P))
        return {"path": str(tmp_path / "emb.h5"), "ids": ids}, r"source.path: .*: 1 row\(s\) hold NaN.* 89 "
    if case == "float16 overflow":
        x[3, 2] = 1e6
        np.save(npy, x)
        return {"path": npy, "ids": ids, "embed": {"store_dtype": "float16"}}, \
            r"embed.store_dtype: float16 cannot hold 1 row\(s\) .* 3 \(id 'img0003.jpg'\)"
    if case == "no ids":
        np.save(npy, x)
        return {"path": npy}, "source.ids: required"
    if case == "two arrays, no name":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "emb.h5", "w") as f:
            f.create_dataset("a", data=x)
            f.create_dataset("b", data=x)
        return {"path": str(tmp_path / "emb.h5"), "ids": ids}, "source.dataset: .* holds 2 2-d arrays"
    raise AssertionError(case)


BAD = ["missing file", "unknown format", "rank 3", "rank 1", "object dtype", "string dtype", "ids count",
       "duplicate ids", "labels count", "NaN rows", "infinite rows", "NaN in hdf5", "float16 overflow", "no ids",
       "two arrays, no name"]


@pytest.mark.parametrize("case", BAD)
def test_bad_arrays_are_refused_before_any_work(tmp_path: Path, case: str) -> None:
    settings, message = _bad(tmp_path, case)
    embed = settings.pop("embed", {})
    path, ids = settings.pop("path"), settings.pop("ids", None)
    cfg = cfg_for(tmp_path, path, ids, embed=embed, **settings)
    with pytest.raises(InputError, match="^" + message):
        preflight(cfg)
    with pytest.raises(InputError, match="^" + message):  # the stage itself refuses too, writing nothing
        run_embed(RunContext.of(cfg))
    assert not (tmp_path / "root").exists()


def test_settings_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    path, ids = _npy(tmp_path, rows())
    with pytest.raises(ConfigError, match="source.limit does not apply"):
        cfg_for(tmp_path, path, ids, limit=10)
    with pytest.raises(ConfigError, match="source.ids applies to source.kind 'embeddings' only"):
        parse_config({"source": {"kind": "folder", "path": str(tmp_path), "ids": ids}})
    with pytest.raises(ConfigError, match="source.images: expected an image source"):
        cfg_for(tmp_path, path, ids, images={"kind": "embeddings", "path": path})
    with pytest.raises(ConfigError, match="^embed.layers: .*imported embeddings"):
        preflight(cfg_for(tmp_path, path, ids, embed={"layers": ["blocks.1"]}))
    with pytest.raises(ConfigError, match="^evaluate.student: scoring a student needs pixels"):
        preflight(parse_config({"root": str(tmp_path / "r"), "device": "cpu", "evaluate": {"student": str(tmp_path)},
                                "source": {"kind": "embeddings", "path": path, "ids": ids}, "cluster": {"k": 3},
                                "transform": {"enabled": False}}))


def test_other_sources_keep_their_keys(tmp_path: Path) -> None:
    """The embeddings-only fields stay out of other sources' identities (their stage keys are unchanged)."""
    ident = sources.source_identity(parse_config({}).source)
    assert not {"format", "dataset", "ids", "labels", "images"} & set(ident)


def test_the_stages_that_read_joined_images_are_keyed_by_their_listing(tmp_path: Path) -> None:
    """Imported embeddings joined to an image folder (`source.images`): an image replaced under its id is a
    new key for the stages that read the pixels (distill trains on them, evaluate embeds them), while the
    imported rows keep their key (embed, and the stages that read only rows); the joined rows carry the
    images' sizes and mtimes. Without `source.images` nothing is listed."""
    import os
    import shutil

    from alignet_core.distill.stage import DistillFiles, plan_distill
    from alignet_core.evaluate.stage import plan_evaluate
    from alignet_core.runtime.runner import StageMetrics, StageOutput
    from tests.generated_images import write_jpeg_folder

    image_ids = write_jpeg_folder(tmp_path / "images", 6, seed=0, size=(40, 40))
    np.save(tmp_path / "emb.npy", rows(n=len(image_ids)))
    (tmp_path / "ids.txt").write_text("\n".join(image_ids) + "\n")
    images = {"kind": "folder", "path": str(tmp_path / "images")}
    cfg = cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"), images=images)
    src = sources.source_from_config(cfg.source)
    victim = tmp_path / "images" / image_ids[2]
    assert src.records[2].size == victim.stat().st_size and src.records[2].mtime_ns == victim.stat().st_mtime_ns

    files = DistillFiles(folder=str(tmp_path), sampling="s", train=str(tmp_path / "train_s.npz"), valid={}, key="k")
    emb, tfm = (StageOutput(stage=s, key=s, dir=str(tmp_path), artifact=str(tmp_path / s),
                            metrics=StageMetrics(seconds=0.0)) for s in ("embed", "transform"))

    def keys() -> tuple[str, str, str]:
        return plan_embed(cfg).key, plan_distill(cfg, files).key, plan_evaluate(cfg, emb, tfm, None).key

    before = keys()
    assert keys() == before  # nothing changed: the same keys
    mtime = victim.stat().st_mtime_ns
    shutil.copy(tmp_path / "images" / image_ids[3], victim)  # new bytes under the same id
    os.utime(victim, ns=(mtime + 10**9, mtime + 10**9))
    after = keys()
    assert after[0] == before[0]  # the imported rows are the same rows
    assert after[1] != before[1] and after[2] != before[2]  # the pixels are not

    bare = cfg_for(tmp_path, str(tmp_path / "emb.npy"), str(tmp_path / "ids.txt"))
    assert sources.pixels_identity(bare.source) == sources.source_identity(bare.source)

"""embed.py: a real model writes a real Zarr store (pooled features, ids, provenance, extra layers, tar
shards); resume after lost chunks or an interruption, and undecodable images, leave it exact."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr

import alignet_core
from alignet_core.config.embed import EmbedConfig
from alignet_core.embed.extract import extract_embeddings
from alignet_core.errors import InputError, StoreError
from alignet_core.io import embedding_store
from alignet_core.io.images import load_image
from alignet_core.io.sources import ImageSource, folder_source, tar_source
from alignet_core.io.store import file_sha256
from alignet_core.models.factory import build_transform, create_model, pooled_features, resolve_weights
from tests.embed._embed import (CPU, TINY, Interrupted, _arrays, _assert_same_store, _write_corrupt_files,  # noqa: F401
                               demo40, tiny)  # fixtures

CFG = EmbedConfig(model="tf_efficientnet_lite0", weights="packaged", batch_size=8, chunk_rows=16)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_model(CFG.model, CFG.weights)


@pytest.fixture(scope="module")
def reference(demo40: ImageSource, lite0: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, list]:
    """An uninterrupted run of the packaged Lite0: (store url, result, progress calls)."""
    url = str(tmp_path_factory.mktemp("embed") / "ref.zarr")
    calls: list[tuple[int, int]] = []
    result = extract_embeddings(demo40, CFG, url, CPU, model=lite0, progress=lambda d, t: calls.append((d, t)))
    return url, result, calls


@pytest.fixture(scope="module")
def tiny_reference(demo40: ImageSource, tiny: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An uninterrupted run of the tiny model: the store url."""
    url = str(tmp_path_factory.mktemp("embed") / "tiny.zarr")
    extract_embeddings(demo40, TINY, url, CPU, model=tiny)
    return url


def test_store_holds_pooled_features_ids_and_provenance(demo40: ImageSource, lite0: torch.nn.Module, reference) -> None:
    url, result, calls = reference
    assert result["n"] == 40 and result["dim"] == 1280 and result["n_valid"] == 40 and result["skipped"] == []
    assert result["seconds"] > 0
    assert calls == [(16, 40), (32, 40), (40, 40)]

    a = _arrays(url)
    assert a["embeddings"].shape == (40, 1280) and a["embeddings"].dtype == np.float32
    assert list(a["ids"]) == list(demo40.ids())
    assert a["valid"].all()
    assert embedding_store.ChunkProgress(url).done() == {0, 1, 2}

    # rows are the model's pooled pre-logits of the right images, in source order
    t = build_transform(lite0)
    x = torch.stack([t(load_image(p)) for p in demo40.paths()[17:21]])
    with torch.inference_mode():
        expected = pooled_features(lite0, x).numpy()
    np.testing.assert_allclose(a["embeddings"][17:21], expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(a["embeddings"], axis=1).min() > 0

    attrs = a["attrs"]
    weights = resolve_weights(CFG.model, CFG.weights)
    assert attrs["model"] == "tf_efficientnet_lite0" and attrs["feature_dim"] == 1280
    assert attrs["weights_path"] == weights and attrs["weights_sha256"] == file_sha256(weights)
    assert attrs["data_config"]["input_size"] == [3, 224, 224] and attrs["data_config"]["interpolation"] == "bicubic"
    assert attrs["torch_version"] == torch.__version__ and attrs["timm_version"] == timm.__version__
    assert attrs["alignet_core_version"] == alignet_core.__version__
    assert attrs["compute"] == {"device": "cpu", "dtype": "float32"}


def test_float16_store_and_default_model_creation(demo40: ImageSource, tmp_path: Path) -> None:
    cfg = EmbedConfig(model="test_resnet", weights=None, batch_size=8, chunk_rows=8, store_dtype="float16")
    src = ImageSource(demo40.records[:8], description="8 emoji")
    result = extract_embeddings(src, cfg, str(tmp_path / "h.zarr"), CPU)
    a = _arrays(str(tmp_path / "h.zarr"))
    assert result["dim"] == 96 and a["embeddings"].shape == (8, 96) and a["embeddings"].dtype == np.float16
    assert a["attrs"]["weights_sha256"] is None and a["valid"].all()


@pytest.mark.numerics
def test_resume_after_lost_chunks_gives_the_identical_store(tiny_reference, demo40, tiny, tmp_path: Path) -> None:
    ref_url = tiny_reference
    url = str(tmp_path / "resumed.zarr")
    shutil.copytree(ref_url, url)
    # chunks 1 and 2 "never finished": no markers, rows and valid flags back to their initial state
    for i in (1, 2):
        (Path(url) / "_progress" / f"{i:08d}.done").unlink()
    g = zarr.open_group(url, mode="r+")
    g["embeddings"][16:] = 0
    g["valid"][16:] = False
    calls: list[tuple[int, int]] = []
    result = extract_embeddings(demo40, TINY, url, CPU, model=tiny, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(32, 40), (40, 40)]  # only the missing chunks ran
    assert result["n_valid"] == 40
    _assert_same_store(url, ref_url)


def test_a_run_interrupted_between_chunks_resumes_to_the_identical_store(tiny_reference, demo40, tiny, tmp_path) -> None:
    url = str(tmp_path / "killed.zarr")

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise Interrupted(f"stopped at {done}/{total}")

    with pytest.raises(Interrupted):
        extract_embeddings(demo40, TINY, url, CPU, model=tiny, progress=stop_after_first_chunk)
    assert embedding_store.ChunkProgress(url).done() == {0}
    assert not _arrays(url)["valid"][16:].any()
    extract_embeddings(demo40, TINY, url, CPU, model=tiny)
    _assert_same_store(url, tiny_reference)
    # a finished store is left alone by a further run
    again = extract_embeddings(demo40, TINY, url, CPU, model=tiny)
    assert again["n_valid"] == 40
    _assert_same_store(url, tiny_reference)


@pytest.mark.numerics
def test_undecodable_images_are_skipped_and_other_rows_unchanged(demo40: ImageSource, tiny, tmp_path: Path) -> None:
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for root in (clean, dirty):
        for rec in demo40.records[:7]:
            (root / rec.label.split()[0].lower()).mkdir(parents=True, exist_ok=True)
            shutil.copy(rec.path, root / rec.label.split()[0].lower() / Path(rec.path).name)
    (dirty / "bad").mkdir()
    broken = _write_corrupt_files(dirty / "bad")
    cfg = EmbedConfig(model="test_resnet", weights=None, batch_size=3, chunk_rows=4, num_workers=2)

    clean_src, dirty_src = folder_source(str(clean)), folder_source(str(dirty))
    assert len(dirty_src) == len(clean_src) + 3
    extract_embeddings(clean_src, cfg, str(tmp_path / "clean.zarr"), CPU, model=tiny)
    result = extract_embeddings(dirty_src, cfg, str(tmp_path / "dirty.zarr"), CPU, model=tiny)

    assert result["n"] == 10 and result["n_valid"] == 7
    assert {s["id"] for s in result["skipped"]} == set(broken)
    for s in result["skipped"]:
        assert broken[s["id"]] in s["reason"] and s["path"] == str(dirty / s["id"])
    a, c = _arrays(str(tmp_path / "dirty.zarr")), _arrays(str(tmp_path / "clean.zarr"))
    ids = list(a["ids"])
    bad_rows = [ids.index(i) for i in broken]
    assert not a["valid"][bad_rows].any() and not a["embeddings"][bad_rows].any()
    good = [ids.index(i) for i in c["ids"]]
    assert a["valid"][good].all()
    np.testing.assert_allclose(a["embeddings"][good], c["embeddings"], rtol=1e-5, atol=1e-5)

    # the skipped list survives a resume of the finished store
    again = extract_embeddings(dirty_src, cfg, str(tmp_path / "dirty.zarr"), CPU, model=tiny)
    assert again["skipped"] == result["skipped"]


# ----------------------------------------------------------------------------- extra layers, tar shards
LAYERED = EmbedConfig(model="test_resnet", weights=None, batch_size=4, chunk_rows=4, layers=["layer1", "layer3.0.conv1"])


def test_extra_layers_are_pooled_in_the_same_pass_and_resume(demo40: ImageSource, tiny, tmp_path: Path) -> None:
    src = ImageSource(demo40.records[:12], description="12 emoji")
    url = str(tmp_path / "layers.zarr")

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise Interrupted(f"stopped at {done}/{total}")

    with pytest.raises(Interrupted):
        extract_embeddings(src, LAYERED, url, CPU, model=tiny, progress=stop_after_first_chunk)
    extract_embeddings(src, LAYERED, url, CPU, model=tiny)
    ref = str(tmp_path / "ref.zarr")
    extract_embeddings(src, LAYERED, ref, CPU, model=tiny)
    _assert_same_store(url, ref)

    g = zarr.open_group(url, mode="r")
    assert dict(g.attrs)["layers"] == ["layer1", "layer3.0.conv1"]
    got = {name: g[f"layers/{name}"][:] for name in LAYERED.layers}
    np.testing.assert_array_equal(got["layer1"], zarr.open_group(ref, mode="r")["layers/layer1"][:])
    assert got["layer1"].shape == (12, 32) and got["layer1"].dtype == np.float32
    assert got["layer3.0.conv1"].shape[0] == 12 and np.abs(got["layer3.0.conv1"]).sum() > 0

    # each row is the spatial mean of that module's output for that image
    t = build_transform(tiny)
    x = torch.stack([t(load_image(p)) for p in src.paths()[9:12]])
    seen = {}
    handles = [tiny.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in LAYERED.layers]
    with torch.inference_mode():
        emb = pooled_features(tiny, x)
    for h in handles:
        h.remove()
    for name in LAYERED.layers:
        np.testing.assert_allclose(got[name][9:12], seen[name].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["embeddings"][9:12], emb.numpy(), rtol=1e-4, atol=1e-5)

    # asking for other layers on the finished store is refused, not mixed in
    with pytest.raises(StoreError, match="layers"):
        extract_embeddings(src, LAYERED.model_copy(update={"layers": ["layer2"]}), url, CPU, model=tiny)


def test_unknown_layer_name_is_an_input_error(demo40: ImageSource, tiny, tmp_path: Path) -> None:
    cfg = TINY.model_copy(update={"layers": ["layer9"]})
    with pytest.raises(InputError, match=r"embed\.layers.*layer9"):
        extract_embeddings(ImageSource(demo40.records[:4], description="4"), cfg, str(tmp_path / "x.zarr"), CPU, model=tiny)


@pytest.mark.numerics
def test_tar_shards_embed_like_the_same_files_on_disk(demo40: ImageSource, tiny, tmp_path: Path) -> None:
    recs = demo40.records[:6]
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for k, rec in enumerate(recs):
            tf.add(rec.path, arcname=f"{k:04d}.png")
            data = rec.label.encode()
            info = tarfile.TarInfo(f"{k:04d}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("0006.png")  # an empty member: skipped, listed, no row shifts
        tf.addfile(info, io.BytesIO(b""))
    src = tar_source(str(shard))
    assert list(src.labels())[:6] == [r.label for r in recs]
    cfg = TINY.model_copy(update={"chunk_rows": 4, "batch_size": 2, "num_workers": 1})
    result = extract_embeddings(src, cfg, str(tmp_path / "tar.zarr"), CPU, model=tiny)
    assert result["n_valid"] == 6 and [s["id"] for s in result["skipped"]] == ["shard-000000/0006"]
    files = ImageSource(recs, description="same files")
    extract_embeddings(files, cfg, str(tmp_path / "files.zarr"), CPU, model=tiny)
    np.testing.assert_array_equal(_arrays(str(tmp_path / "tar.zarr"))["embeddings"][:6], _arrays(str(tmp_path / "files.zarr"))["embeddings"])


def test_progress_bar_shows_in_the_terminal(demo40: ImageSource, tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    extract_embeddings(ImageSource(demo40.records[:4], description="4"), TINY, str(tmp_path / "bar.zarr"), CPU, model=tiny)
    err = capsys.readouterr().err
    assert "embed" in err and "4/4" in err

"""embed.py: a real model writes a real Zarr store; resume and undecodable images leave it exact."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
import zarr

import alignet_core
from alignet_core import store
from alignet_core.config import EmbedConfig
from alignet_core.embed import extract_embeddings
from alignet_core.models import build_transform, create_model, pooled_features, resolve_weights
from alignet_core.store import file_sha256
from alignet_core.sources import ImageSource, demo_source, folder_source, load_image

CPU = torch.device("cpu")
CFG = EmbedConfig(model="tf_efficientnet_lite0", weights="packaged", batch_size=8, chunk_rows=16)
# resume and skip tests need a real forward pass, not good features: timm's tiny test model, random init
TINY = EmbedConfig(model="test_resnet", weights=None, batch_size=8, chunk_rows=16)


class Interrupted(Exception):
    """Raised from the progress callback to stop a real run between two chunks."""


@pytest.fixture(scope="module")
def demo40() -> ImageSource:
    src = demo_source()
    return ImageSource(src.records[::47][:40], description="demo slice: every 47th emoji")


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_model(CFG.model, CFG.weights)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_model(TINY.model, TINY.weights)


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


def _arrays(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    return {"embeddings": g["embeddings"][:], "ids": g["ids"][:], "valid": g["valid"][:], "attrs": dict(g.attrs)}


def _assert_same_store(a: str, b: str) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x["embeddings"].dtype == y["embeddings"].dtype
    np.testing.assert_array_equal(x["embeddings"], y["embeddings"])
    np.testing.assert_array_equal(x["ids"], y["ids"])
    np.testing.assert_array_equal(x["valid"], y["valid"])
    assert x["attrs"] == y["attrs"]


def test_store_holds_pooled_features_ids_and_provenance(demo40: ImageSource, lite0: torch.nn.Module, reference) -> None:
    url, result, calls = reference
    assert result["n"] == 40 and result["dim"] == 1280 and result["n_valid"] == 40 and result["skipped"] == []
    assert result["seconds"] > 0
    assert calls == [(16, 40), (32, 40), (40, 40)]

    a = _arrays(url)
    assert a["embeddings"].shape == (40, 1280) and a["embeddings"].dtype == np.float32
    assert list(a["ids"]) == list(demo40.ids())
    assert a["valid"].all()
    assert store.ChunkProgress(url).done() == {0, 1, 2}

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


def test_float16_store_and_default_model_creation(demo40: ImageSource, tmp_path: Path) -> None:
    cfg = EmbedConfig(model="test_resnet", weights=None, batch_size=8, chunk_rows=8, store_dtype="float16")
    src = ImageSource(demo40.records[:8], description="8 emoji")
    result = extract_embeddings(src, cfg, str(tmp_path / "h.zarr"), CPU)
    a = _arrays(str(tmp_path / "h.zarr"))
    assert result["dim"] == 96 and a["embeddings"].shape == (8, 96) and a["embeddings"].dtype == np.float16
    assert a["attrs"]["weights_sha256"] is None and a["valid"].all()


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
    assert store.ChunkProgress(url).done() == {0}
    assert not _arrays(url)["valid"][16:].any()
    extract_embeddings(demo40, TINY, url, CPU, model=tiny)
    _assert_same_store(url, tiny_reference)
    # a finished store is left alone by a further run
    again = extract_embeddings(demo40, TINY, url, CPU, model=tiny)
    assert again["n_valid"] == 40
    _assert_same_store(url, tiny_reference)


def _write_corrupt_files(cls_dir: Path) -> dict[str, str]:
    (cls_dir / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (cls_dir / "truncated.png").write_bytes(buf.getvalue()[:300])
    (cls_dir / "text.png").write_text("this is not a picture\n")
    return {"bad/zero.png": "empty", "bad/truncated.png": "truncated", "bad/text.png": "not a readable image"}


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

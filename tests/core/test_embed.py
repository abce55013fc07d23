"""embed.py: a real model writes a real Zarr store; resume and undecodable images leave it exact; several
worker processes write the same store; the torchvision JPEG path and torch.compile stay close to the default."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
import torchvision
import zarr

import alignet_core
from alignet_core.config import EmbedConfig, parse_config
from alignet_core.embed.devices import _worker_env, shard_chunks
from alignet_core.embed.extract import extract_embeddings
from alignet_core.embed.extractor import _Extractor
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.hardware import resolve_devices
from alignet_core.io import embedding_store
from alignet_core.io.images import decode_image_bytes, load_image
from alignet_core.io.sources import ImageSource, demo_source, folder_source, tar_source
from alignet_core.io.store import file_sha256
from alignet_core.models import build_tensor_transform, build_transform, create_model, pooled_features, resolve_weights
from tests.generated_images import write_jpeg_folder, write_odd_files

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


def _write_corrupt_files(cls_dir: Path) -> dict[str, str]:
    (cls_dir / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (cls_dir / "truncated.png").write_bytes(buf.getvalue()[:300])
    (cls_dir / "text.png").write_text("this is not a picture\n")
    return {"bad/zero.png": "empty", "bad/truncated.png": "truncated", "bad/text.png": "not a readable image"}


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


# ----------------------------------------------------------------------------- several devices
def test_devices_are_checked_before_any_work(demo40: ImageSource, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"embed\.devices.*'gpu0'.*expected 'cpu', 'cuda' or 'cuda:<index>'"):
        parse_config({"embed": {"devices": ["cuda:0", "gpu0"]}})
    with pytest.raises(ConfigError, match=r"embed\.devices.*mixes cpu and cuda"):
        parse_config({"embed": {"devices": ["cpu", "cuda:0"]}})
    with pytest.raises(ConfigError, match=r"embed\.devices.*empty list"):
        parse_config({"embed": {"devices": []}})
    assert parse_config({"embed": {"devices": ["cpu", "cpu"]}}).embed.devices == ["cpu", "cpu"]
    assert resolve_devices(["cpu", "cpu"]) == [CPU, CPU]
    if not torch.cuda.is_available():
        src = ImageSource(demo40.records[:4], description="4")
        url = tmp_path / "never.zarr"
        for devices in (["cuda:0", "cuda:1"], ["cuda"]):
            with pytest.raises(ConfigError, match=r"embed\.devices.*asks for CUDA but torch sees no CUDA GPU"):
                extract_embeddings(src, TINY.model_copy(update={"devices": devices}), str(url), CPU)
        assert not url.exists()  # nothing was written
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=rf"embed\.devices.*'cuda:{n}'.*torch sees {n} CUDA GPU"):
            resolve_devices([f"cuda:{n}"])


def test_shards_are_contiguous_disjoint_runs_of_whole_chunks() -> None:
    assert shard_chunks(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert shard_chunks([1, 2, 7, 8, 9], 2) == [[1, 2], [7, 8, 9]]  # resumed: only the chunks left, balanced
    assert shard_chunks([3], 4) == [[3]]  # never an empty shard (no idle worker is started)
    for n, k in ((17, 3), (4, 4), (100, 7)):
        shards = shard_chunks(list(range(n)), k)
        assert [c for s in shards for c in s] == list(range(n)) and max(map(len, shards)) - min(map(len, shards)) <= 1
    # each worker sees only its own GPU, as cuda:0; CPU workers see none
    assert _worker_env(torch.device("cuda:3")) == ({"CUDA_VISIBLE_DEVICES": "3"}, "cuda:0")
    assert _worker_env(CPU) == ({"CUDA_VISIBLE_DEVICES": ""}, "cpu")


@pytest.mark.slow  # two worker processes start and import torch: ~25 s on 2 cores
def test_two_cpu_workers_finish_a_partial_store_into_the_single_process_store(
    demo40: ImageSource, tiny, tmp_path: Path, one_torch_thread: None
) -> None:
    """Two Dask worker processes (devices ['cpu', 'cpu']) resume a run stopped after one chunk; the store
    is byte-identical to one process's uninterrupted run: ids in order, embeddings, valid, skipped, attrs."""
    root = tmp_path / "images"
    for rec in demo40.records[:21]:
        (root / "emoji").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, root / "emoji" / Path(rec.path).name)
    (root / "bad").mkdir()
    broken = _write_corrupt_files(root / "bad")
    src = folder_source(str(root))
    cfg = TINY.model_copy(update={"chunk_rows": 4, "batch_size": 3, "num_workers": 1})
    single = str(tmp_path / "single.zarr")
    extract_embeddings(src, cfg, single, CPU)

    url = str(tmp_path / "two.zarr")

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise Interrupted(f"stopped at {done}/{total}")

    with pytest.raises(Interrupted):
        extract_embeddings(src, cfg, url, CPU, progress=stop_after_first_chunk)
    calls: list[tuple[int, int]] = []
    result = extract_embeddings(src, cfg.model_copy(update={"devices": ["cpu", "cpu"]}), url, CPU,
                                progress=lambda d, t: calls.append((d, t)))
    assert result["n"] == 24 and result["n_valid"] == 21 and {s["id"] for s in result["skipped"]} == set(broken)
    assert calls[-1] == (24, 24)
    _assert_same_store(url, single)
    for name in ("_skipped", "_progress"):
        assert sorted(p.name for p in (Path(url) / name).iterdir()) == sorted(p.name for p in (Path(single) / name).iterdir())
    for p in (Path(single) / "_skipped").iterdir():
        assert (Path(url) / "_skipped" / p.name).read_bytes() == p.read_bytes()


# ----------------------------------------------------------------------------- JPEG decode on the device
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """30 generated RGB JPEGs of random sizes in class folders, and the odd files of `write_odd_files` in odd/."""
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root, 30, seed=0)
    return root, write_odd_files(root / "odd")


def test_torchvision_decode_is_close_to_pil_and_skips_exactly_alike(jpeg_folder, tiny, tmp_path: Path) -> None:
    root, odd = jpeg_folder
    src = folder_source(str(root))
    cfg = TINY.model_copy(update={"batch_size": 4, "chunk_rows": 8, "num_workers": 2})
    pil = extract_embeddings(src, cfg, str(tmp_path / "pil.zarr"), CPU, model=tiny)
    tv = extract_embeddings(src, cfg.model_copy(update={"decode": "torchvision"}), str(tmp_path / "tv.zarr"), CPU, model=tiny)

    # undecodable files: the same rows, ids, paths and reasons; no row shifted
    assert tv["skipped"] == pil["skipped"]
    assert [s["id"] for s in pil["skipped"]] == ["odd/empty.jpg", "odd/text.jpg", "odd/truncated.jpg"]
    a, b = _arrays(str(tmp_path / "pil.zarr")), _arrays(str(tmp_path / "tv.zarr"))
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_array_equal(a["valid"], b["valid"])
    assert b["attrs"]["decode"] == "torchvision" and a["attrs"]["decode"] == "pil"

    ids = list(a["ids"])
    x, y = a["embeddings"], b["embeddings"]
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    on_device = [i for i, name in enumerate(ids) if not name.startswith("odd/")] + [
        ids.index(f"odd/{n}") for n in ("gray.jpg", "progressive.jpg")
    ]
    assert cos[on_device].min() > 0.999
    assert not np.array_equal(x[on_device], y[on_device])  # they really were decoded and resized another way
    # CMYK, EXIF-rotated, bytes after the end marker, PNG: the PIL path, the very same pixels
    pil_rows = [ids.index(f"odd/{n}") for n in ("cmyk.jpg", "rotated.jpg", "trailing.jpg", "picture.png")]
    np.testing.assert_allclose(y[pil_rows], x[pil_rows], rtol=1e-5, atol=1e-6)
    assert not y[[ids.index(s["id"]) for s in pil["skipped"]]].any()


def test_tensor_transform_follows_the_models_data_config(jpeg_folder, tiny) -> None:
    """The torch-ops transform of JPEG pixels is timm's PIL eval transform up to one 8-bit level."""
    root, _ = jpeg_folder
    path = sorted(root.glob("class1/*.jpg"))[0]
    for model in (tiny, timm.create_model("test_vit", pretrained=False)):  # bilinear / bicubic, crop_pct 0.95
        want = build_transform(model)(load_image(str(path)))
        img = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB)
        got = build_tensor_transform(model)([img])[0]
        assert got.shape == want.shape
        std = torch.tensor(model.pretrained_cfg["std"]).reshape(3, 1, 1)
        assert ((got - want).abs() * std).max() <= 1.01 / 255  # at most one level of 8 bits apart
    odd = timm.create_model("test_resnet", pretrained=False)
    odd.pretrained_cfg = {**odd.pretrained_cfg, "crop_mode": "border"}
    with pytest.raises(InputError, match=r"embed\.decode: 'torchvision' cannot reproduce.*'border'.*use decode 'pil'"):
        build_tensor_transform(odd)


def test_bytes_the_device_decoder_refuses_go_through_pil(jpeg_folder, tiny) -> None:
    root, _ = jpeg_folder
    src = folder_source(str(root))
    good = (root / src.records[0].id).read_bytes()
    fake = b"\xff\xd8\xff\xe0" + bytes(range(256)) + b"\xff\xd9"  # JPEG-looking bytes, no image inside
    cfg = TINY.model_copy(update={"decode": "torchvision"})
    run = _Extractor(tiny, cfg, CPU, src, build_transform(tiny), build_tensor_transform(tiny), {})
    as_tensor = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in (good, fake, good)]
    rows, x, failed = run.decode_jpegs([0, 1, 2], as_tensor)
    assert rows == [0, 2] and x.shape == (2, 3, 160, 160)
    with pytest.raises(InputError) as err:  # exactly the PIL path's reason
        decode_image_bytes(fake, src.records[1].path)
    assert failed == [(1, str(err.value))]
    torch.testing.assert_close(x[0], x[1])


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compiled_extraction_matches_eager(demo40: ImageSource, tiny, tmp_path: Path, one_torch_thread: None) -> None:
    """compile: the same rows up to float rounding, one compile for every batch size (padding), hooks too."""
    src = ImageSource(demo40.records[:22], description="22 emoji")
    cfg = TINY.model_copy(update={"batch_size": 4, "chunk_rows": 6, "layers": ["layer1"]})  # batches of 4, 2, 4, 2, ...
    extract_embeddings(src, cfg, str(tmp_path / "eager.zarr"), CPU, model=tiny)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    extract_embeddings(src, cfg.model_copy(update={"compile": True}), str(tmp_path / "compiled.zarr"), CPU, model=tiny)
    assert counters["stats"]["unique_graphs"] == 1  # no recompile for short batches or the layer hooks
    e, c = zarr.open_group(str(tmp_path / "eager.zarr"), mode="r"), zarr.open_group(str(tmp_path / "compiled.zarr"), mode="r")
    np.testing.assert_allclose(c["embeddings"][:], e["embeddings"][:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c["layers/layer1"][:], e["layers/layer1"][:], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(c["valid"][:], e["valid"][:])
    assert dict(c.attrs)["compile"] is True and dict(e.attrs)["compile"] is False


def test_stage_key_ignores_devices_but_not_compile_or_decode(tmp_path: Path) -> None:
    """Which devices run the extraction changes no stored value, so a store made on two workers
    is reused (or resumed) by a one-device run; compile and decode change rounding, so they key."""
    from alignet_core.config import PipelineConfig
    from alignet_core.embed.stage import plan_embed

    def key(**embed: object) -> str:
        return plan_embed(PipelineConfig(root=str(tmp_path), embed=embed)).key

    base = key()
    assert key(devices=["cpu", "cpu"]) == key(devices=["cpu"]) == base
    assert len({base, key(compile=True), key(decode="torchvision")}) == 3


def test_stage_key_and_provenance_name_the_compute_device_and_dtype(tmp_path: Path) -> None:
    """GPU rows are bf16-autocast, CPU rows float32: a store made on one is never served for the other."""
    from alignet_core.config import PipelineConfig
    from alignet_core.embed.stage import embed_compute, plan_embed
    from alignet_core.hardware import ComputeIdentity

    cfg = PipelineConfig(root=str(tmp_path), device="cpu")
    assert embed_compute(cfg) == ComputeIdentity(device="cpu", dtype="float32")
    cpu = plan_embed(cfg)
    assert cpu.key == plan_embed(cfg, ComputeIdentity("cpu", "float32")).key
    keys = {cpu.key, plan_embed(cfg, ComputeIdentity("cuda", "bfloat16")).key,
            plan_embed(cfg, ComputeIdentity("cuda", "float32")).key, plan_embed(cfg, ComputeIdentity("cpu", "bfloat16")).key}
    assert len(keys) == 4


def test_the_stage_refuses_too_many_skipped_images_and_keeps_the_embeddings(demo40: ImageSource, tmp_path: Path) -> None:
    """run_embed: 3 of 10 images undecodable → InputError naming the count, the limit and the reasons; the
    store is finished and kept, and a higher `embed.max_skipped_fraction` reuses it under the same key."""
    from alignet_core.embed.stage import plan_embed, run_embed

    folder = tmp_path / "images"
    for rec in demo40.records[:7]:
        (folder / "ok").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / "ok" / Path(rec.path).name)
    (folder / "bad").mkdir()
    _write_corrupt_files(folder / "bad")
    cfg = parse_config({"root": str(tmp_path / "root"), "device": "cpu", "source": {"kind": "folder", "path": str(folder)},
                        "cluster": {"k": 2}, "embed": {"model": "test_resnet", "weights": None, "chunk_rows": 4}})
    with pytest.raises(InputError, match=r"embed.max_skipped_fraction: 3 of 10 images \(30.0%\).*limit 1%.*"
                                         r"reasons: .*bad/"):
        run_embed(cfg)
    plan = plan_embed(cfg)
    manifest = Path(plan.dir) / "manifest.json"
    assert manifest.exists()
    looser = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"max_skipped_fraction": 0.3})})
    assert plan_embed(looser).key == plan.key
    before = manifest.stat().st_mtime_ns
    out = run_embed(looser)
    assert manifest.stat().st_mtime_ns == before and len(out.metrics.skipped) == 3 and out.metrics.n_valid == 7
    assert sum(out.metrics.skipped_reasons().values()) == 3

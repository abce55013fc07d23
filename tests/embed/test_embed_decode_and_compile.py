"""embed.py's alternatives to the default path stay close to it: the torchvision JPEG decode on the device
(against PIL) and torch.compile (against eager extraction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import zarr

from alignet_core.embed.extract import extract_embeddings
from alignet_core.embed.extractor import _Extractor
from alignet_core.errors import ConfigError, InputError
from alignet_core.io.images import decode_image_bytes, load_image
from alignet_core.io.sources import ImageSource, folder_source
from alignet_core.models.factory import build_tensor_transform, build_transform, pooled_features
from tests.embed._embed import CPU, TINY, _arrays, demo40, tiny  # noqa: F401 (fixtures)
from tests.generated_images import write_jpeg_folder, write_odd_files


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


# ----------------------------------------------------------------------------- embed.image_size
def test_image_size_resizes_both_decode_paths_and_is_recorded(jpeg_folder, tiny, tmp_path: Path) -> None:
    """`embed.image_size`: the model sees that square size on the PIL and the torchvision path (the rows are
    those of the model run on the resized pixels), and the store's provenance records it."""
    root, _ = jpeg_folder
    src = ImageSource(folder_source(str(root)).records[:6], description="6 JPEGs")
    cfg = TINY.model_copy(update={"batch_size": 3, "chunk_rows": 6, "image_size": 96})
    path = src.records[0].path
    assert build_transform(tiny, 96)(load_image(path)).shape == (3, 96, 96)
    img = torchvision.io.decode_jpeg(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    assert build_tensor_transform(tiny, 96)([img]).shape == (1, 3, 96, 96)
    for decode in ("pil", "torchvision"):
        url = str(tmp_path / f"{decode}.zarr")
        extract_embeddings(src, cfg.model_copy(update={"decode": decode}), url, CPU, model=tiny)
        assert _arrays(url)["attrs"]["data_config"]["input_size"] == [3, 96, 96]
    x = torch.stack([build_transform(tiny, 96)(load_image(r.path)) for r in src.records])
    with torch.inference_mode():
        want = pooled_features(tiny.eval(), x).numpy()
    pil, tv = _arrays(str(tmp_path / "pil.zarr"))["embeddings"], _arrays(str(tmp_path / "torchvision.zarr"))["embeddings"]
    np.testing.assert_allclose(pil, want, rtol=1e-4, atol=1e-5)  # BatchNorm folding and channels_last: float rounding
    cos = (pil * tv).sum(1) / (np.linalg.norm(pil, axis=1) * np.linalg.norm(tv, axis=1))
    assert cos.min() > 0.999  # the tensor path resamples with other rounding (the test above)
    default = str(tmp_path / "default.zarr")
    extract_embeddings(src, TINY.model_copy(update={"batch_size": 3, "chunk_rows": 6}), default, CPU, model=tiny)
    assert _arrays(default)["attrs"]["data_config"]["input_size"] == [3, 160, 160]
    assert not np.allclose(_arrays(default)["embeddings"], _arrays(str(tmp_path / "pil.zarr"))["embeddings"])
    with pytest.raises(ConfigError, match="image_size"):
        build_transform(tiny, 0)

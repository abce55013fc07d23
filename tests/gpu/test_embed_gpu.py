"""Extraction on a GPU: autocast rows against float32, nvjpeg decode against PIL, two worker processes
sharing the GPUs, pinned host memory, and every tensor where it was asked to be (no silent CPU fallback).

Models are random-init timm models (nothing is downloaded): ViT-B/16 and ResNet-50 on a GPU, their
tiny test versions in a CPU dry run. Tolerances (`BF16`, `FP16`) are stated relative to the spread of the
features between images, so that an autocast that destroyed the signal could not pass: measured on the
CPU (oneDNN bf16/fp16, float32 accumulation, as tensor cores), on 16 demo images, the largest error was
0.058 of the spread for bf16 (ResNet-50; ViT-B/16 0.028) and 0.007 for fp16, the smallest centred cosine
0.9983 and 0.99998; the bounds leave 2.5-4x for the GPU's other kernels (and BatchNorm folding).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from alignet_core.config.embed import EmbedConfig
from alignet_core.distill.batches import TripletBatches
from alignet_core.embed.extract import extract_embeddings
from alignet_core.embed.extractor import _Extractor
from alignet_core.embed.loader import image_loader
from alignet_core.hardware import autocast_dtype, compute_identity, resolve_device
from alignet_core.io import formats
from alignet_core.io.images import load_image
from alignet_core.io.sources import ImageSource, demo_source, folder_source
from alignet_core.models.embedding import loader
from alignet_core.models.factory import (
    build_tensor_transform,
    build_transform,
    create_model,
    pooled_features,
)
from tests.generated_images import write_jpeg_folder, write_odd_files

pytestmark = pytest.mark.gpu

#: (max error / between-image spread, min centred cosine) of autocast rows against float32 rows
BF16 = (0.15, 0.99)
FP16 = (0.03, 0.999)
TINY = EmbedConfig(model="test_resnet", weights=None, batch_size=8, chunk_rows=16)


def _models(device: torch.device) -> list[str]:
    return ["vit_base_patch16_224", "resnet50"] if device.type == "cuda" else ["test_vit", "test_resnet"]


@pytest.fixture(scope="module")
def images() -> ImageSource:
    src = demo_source()
    return ImageSource(src.records[::119][:16], description="16 demo emoji")


def _model(name: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(name, None).eval()


def _float32_rows(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference rows: plain float32 forward, TF32 off for matrix products and convolutions."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            return pooled_features(model, x).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _assert_close_to(rows: torch.Tensor, ref: torch.Tensor, tolerance: tuple[float, float], what: str) -> None:
    max_error, min_cos = tolerance
    centre = ref.mean(0)
    spread = (ref - centre).norm(dim=1)
    error = ((rows - ref).norm(dim=1) / spread).max().item()
    cos = torch.nn.functional.cosine_similarity(rows - centre, ref - centre).min().item()
    assert error <= max_error and cos >= min_cos, f"{what}: error/spread {error:.4f} (≤ {max_error}), centred cosine {cos:.5f} (≥ {min_cos})"


def test_device_choice_never_falls_back_to_the_cpu(device: torch.device) -> None:
    if device.type == "cuda":
        assert resolve_device("auto").type == "cuda" and resolve_device("cuda").type == "cuda"
        assert autocast_dtype(device) == torch.bfloat16  # every GPU of the device check (Ampere or later)
        assert compute_identity(device).dtype == "bfloat16"


@pytest.mark.parametrize("index", [0, 1])
def test_extraction_under_autocast_matches_float32(device: torch.device, images: ImageSource, index: int,
                                                   tmp_path: Path) -> None:
    """The extraction (bf16 autocast on a GPU, channels_last, BatchNorm folded) writes rows within `BF16` of a
    plain float32 forward of the same model, on the device; fp16 autocast within `FP16`."""
    name = _models(device)[index]
    model = _model(name)
    reference_model = copy.deepcopy(model).to(device)
    x = torch.stack([build_transform(model)(load_image(p)) for p in images.paths()]).to(device)
    ref = _float32_rows(reference_model, x)
    assert ref.device.type == device.type

    cfg = EmbedConfig(model=name, weights=None, batch_size=8, chunk_rows=16, store_dtype="float32")
    url = str(tmp_path / "e.zarr")
    result = extract_embeddings(images, cfg, url, device, model=model)
    assert result["n_valid"] == len(images)
    assert next(model.parameters()).device.type == device.type  # the model was moved, not copied to the CPU
    g = zarr.open_group(url, mode="r")
    assert dict(g.attrs)["compute"] == {"device": device.type, "dtype": "bfloat16" if device.type == "cuda" else "float32"}
    _assert_close_to(torch.from_numpy(g["embeddings"][:]).to(device), ref, BF16, f"{name} extraction")

    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16):
        half = pooled_features(reference_model, x)
    assert half.device.type == device.type
    _assert_close_to(half.float(), ref, FP16, f"{name} fp16 autocast")


def test_jpeg_decode_on_the_device_matches_pil(device: torch.device, tmp_path: Path) -> None:
    """`embed.decode: torchvision` decodes on the device (nvjpeg on a GPU): the same rows as PIL up to
    resampling, the same files skipped for the same reasons."""
    root = tmp_path / "jpegs"
    write_jpeg_folder(root, 12 if device.type == "cpu" else 24, seed=0)
    write_odd_files(root / "odd")
    src = folder_source(str(root))
    model = _model(TINY.model)
    cfg = TINY.model_copy(update={"batch_size": 4, "chunk_rows": 8, "num_workers": 2})
    pil = extract_embeddings(src, cfg, str(tmp_path / "pil.zarr"), device, model=copy.deepcopy(model))
    tv = extract_embeddings(src, cfg.model_copy(update={"decode": "torchvision"}), str(tmp_path / "tv.zarr"), device,
                            model=copy.deepcopy(model))
    assert tv["skipped"] == pil["skipped"] and len(pil["skipped"]) == 3
    a, b = zarr.open_group(str(tmp_path / "pil.zarr"), mode="r"), zarr.open_group(str(tmp_path / "tv.zarr"), mode="r")
    np.testing.assert_array_equal(a["valid"][:], b["valid"][:])
    ids = [str(i) for i in a["ids"][:]]
    decoded = [i for i, name in enumerate(ids) if not name.startswith("odd/")]
    x, y = a["embeddings"][:][decoded], b["embeddings"][:][decoded]
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    assert cos.min() > 0.999

    on_device = model.to(device)
    run = _Extractor(on_device, cfg, device, src, build_transform(model), build_tensor_transform(model), {})
    data = [torch.frombuffer(bytearray((root / src.records[i].id).read_bytes()), dtype=torch.uint8) for i in decoded[:3]]
    rows, pixels, failed = run.decode_jpegs(decoded[:3], data)
    assert rows == decoded[:3] and failed == [] and pixels.device.type == device.type  # decoded there, not on the host


@pytest.mark.slow  # two worker processes start, import torch and initialise CUDA
def test_two_embed_workers_share_the_gpus_and_write_the_single_process_store(device: torch.device, images: ImageSource,
                                                                              tmp_path: Path) -> None:
    """`embed.devices`: two Dask worker processes on one GPU (or one per GPU when there are several) write,
    byte for byte, the store one process writes on that GPU."""
    pytest.importorskip("distributed", reason="Dask's distributed is not installed (the GPU wheelhouse carries it)")
    root = tmp_path / "images"
    (root / "emoji").mkdir(parents=True)
    for rec in images.records:
        shutil.copy(rec.path, root / "emoji" / Path(rec.path).name)
    src = folder_source(str(root))
    cfg = TINY.model_copy(update={"chunk_rows": 4, "batch_size": 4, "num_workers": 1})
    single = str(tmp_path / "single.zarr")
    extract_embeddings(src, cfg, single, device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda:0", "cuda:0"]
    else:
        devices = ["cpu", "cpu"]
    many = str(tmp_path / "many.zarr")
    result = extract_embeddings(src, cfg.model_copy(update={"devices": devices}), many, device)
    assert result["n_valid"] == len(images)
    x, y = zarr.open_group(single, mode="r"), zarr.open_group(many, mode="r")
    np.testing.assert_array_equal(y["embeddings"][:], x["embeddings"][:])
    np.testing.assert_array_equal(y["ids"][:], x["ids"][:])
    np.testing.assert_array_equal(y["valid"][:], x["valid"][:])
    assert dict(y.attrs) == dict(x.attrs)


def test_loaders_pin_host_memory_for_the_gpu(device: torch.device, images: ImageSource) -> None:
    """The extraction's and the distillation's DataLoaders hand over batches in pinned memory on a GPU
    (so the copies overlap compute), pageable memory on the CPU."""
    model = _model(TINY.model)
    batches = image_loader(images, build_transform(model), False, [(0, 0, 8)], 4, 1, device)
    batch = next(iter(batches))
    assert batch["x"].is_pinned() == (device.type == "cuda")

    idx = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    split = formats.AlignetTriplets(idx, images.ids()[idx], np.tile(np.float32([3, 1, 0]), (4, 1)))
    data = TripletBatches(split, images, build_transform(model), 2, seed=0)
    pixels, _, sims, _ = next(loader(data, range(0, 2), 1, device))
    assert pixels.is_pinned() == (device.type == "cuda") and sims.is_pinned() == (device.type == "cuda")

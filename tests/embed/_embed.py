"""What the test_embed_*.py modules share: the tiny model's config, the demo slice and the tiny model as
fixtures (imported by name where used), and helpers that read, compare and corrupt stores."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import zarr

from alignet_core.config.embed import EmbedConfig
from alignet_core.io.sources import ImageSource, demo_source
from alignet_core.models.factory import create_model

CPU = torch.device("cpu")
# resume and skip tests need a real forward pass, not good features: timm's tiny test model, random init
TINY = EmbedConfig(model="test_resnet", weights=None, batch_size=8, chunk_rows=16)


class Interrupted(Exception):
    """Raised from the progress callback to stop a real run between two chunks."""


@pytest.fixture(scope="module")
def demo40() -> ImageSource:
    src = demo_source()
    return ImageSource(src.records[::47][:40], description="demo slice: every 47th emoji")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_model(TINY.model, TINY.weights)


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


def _write_corrupt_files(cls_dir: Path) -> dict[str, str]:
    (cls_dir / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (cls_dir / "truncated.png").write_bytes(buf.getvalue()[:300])
    (cls_dir / "text.png").write_text("this is not a picture\n")
    return {"bad/zero.png": "empty", "bad/truncated.png": "truncated", "bad/text.png": "not a readable image"}

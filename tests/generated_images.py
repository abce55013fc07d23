"""Small real image folders for embedding tests: smooth random pictures saved as JPEG, plus odd files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image


def picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: a few random colour waves and a soft blob, photo-like enough to compress well."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.002, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
            out[..., c] += np.sin(fy * yy * 6.3 + fx * xx * 6.3 + phase)
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, max(height, width) / 3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    out = 128 + 35 * out + 90 * blob[..., None] * rng.uniform(-1, 1, 3)
    return np.clip(out + rng.normal(0, 3, out.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(img: PIL.Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def write_jpeg_folder(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (150, 400)) -> list[str]:
    """`n` RGB JPEGs of random sizes (sides within `size`) in three class folders; returns their ids."""
    rng = np.random.default_rng(seed)
    ids = []
    for k in range(n):
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        rel = f"class{k % 3}/{k:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(PIL.Image.fromarray(picture(rng, h, w))))
        ids.append(rel)
    return ids


def write_odd_files(folder: Path, seed: int = 1) -> dict[str, str]:
    """Files that test decoding paths, in `folder`: name → what it is.

    Decodable: a grayscale, a CMYK, an EXIF-rotated, a progressive JPEG, a JPEG with bytes after its
    end marker, a PNG. Not decodable: a truncated JPEG, an empty file, a text file named .jpg.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = PIL.Image.fromarray(picture(rng, 180, 240))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    whole = jpeg_bytes(rgb)
    files = {
        "gray.jpg": (jpeg_bytes(rgb.convert("L")), "grayscale JPEG"),
        "cmyk.jpg": (jpeg_bytes(rgb.convert("CMYK")), "CMYK JPEG"),
        "rotated.jpg": (jpeg_bytes(rgb, exif=exif.tobytes()), "JPEG with EXIF orientation 6"),
        "progressive.jpg": (jpeg_bytes(rgb, progressive=True), "progressive JPEG"),
        "trailing.jpg": (whole + b"\x00" * 16 + b"camera-data", "JPEG followed by other bytes"),
        "picture.png": (_png(rgb), "PNG"),
        "truncated.jpg": (whole[: len(whole) // 2], "truncated"),
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is not a picture\n", "not a readable image"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: what for name, (_, what) in files.items()}


def _png(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()

"""Image sources with stable ids, and robust decoding of the images they name.

A source is an ordered, immutable list of `ImageRecord(id, path, label)`. The id is what ties a row of
an embedding store to its image, so it must be unique and must not depend on where the data lives:
the emoji id for the demo set, the path relative to the root (folder) or to the list's folder
(file list). Paths may be fsspec URLs; local paths are the main case.

`load_image` turns any common file into an 8-bit RGB PIL image (EXIF orientation applied, alpha
composited on white, palette/CMYK/16-bit converted) or raises `InputError` naming the file and why.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import PIL.Image
import PIL.ImageOps
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import InputError

if TYPE_CHECKING:
    from alignet_core.config import SourceConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LABEL_LEVELS = ("category", "subcategory")


@dataclass(frozen=True)
class ImageRecord:
    """One image: a stable unique id, where its bytes are (path or fsspec URL), an optional class label."""

    id: str
    path: str
    label: str | None = None


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of images; row i of every store written from it belongs to `records[i]`.

    Construction rejects an empty list and duplicate ids (`InputError` naming `description`).
    """

    records: tuple[ImageRecord, ...]
    description: str

    def __post_init__(self) -> None:
        if not self.records:
            raise InputError(f"{self.description}: no images found")
        dup = [i for i, c in Counter(r.id for r in self.records).items() if c > 1]
        if dup:
            raise InputError(
                f"{self.description}: {len(dup)} duplicate image id(s), each id must be unique; e.g. {dup[:3]}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def ids(self) -> np.ndarray:
        """(n,) str: the image ids in source order."""
        return np.asarray([r.id for r in self.records], dtype=str)

    def paths(self) -> list[str]:
        """The n image paths (or URLs) in source order."""
        return [r.path for r in self.records]

    def labels(self) -> np.ndarray:
        """(n,) str: class labels in source order, '' where unknown."""
        return np.asarray([r.label or "" for r in self.records], dtype=str)


# ----------------------------------------------------------------------------- the demo set
def demo_data_dir() -> Path:
    """The folder of the shipped emoji demo set (`metadata.csv`, `images/`)."""
    return Path(__file__).resolve().parent / "data"


def demo_metadata() -> list[dict[str, str]]:
    """Rows of the demo's metadata.csv (id, image, name, category, subcategory, sort_order), in file order."""
    path = demo_data_dir() / "metadata.csv"
    if not path.is_file():
        raise InputError(f"{path}: the demo dataset is missing; rebuild it with `python scripts/build_demo_data.py`")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def demo_source(label_level: str = "category") -> ImageSource:
    """The 1,906 emoji images in metadata.csv order, labelled by `label_level` ('category' or 'subcategory')."""
    if label_level not in LABEL_LEVELS:
        raise InputError(f"source.label_level: expected one of {LABEL_LEVELS}, got {label_level!r}")
    images = demo_data_dir() / "images"
    records = tuple(
        ImageRecord(id=row["id"], path=str(images / row["image"]), label=row[label_level]) for row in demo_metadata()
    )
    return ImageSource(records, description=f"demo emoji set ({demo_data_dir()})")


# ----------------------------------------------------------------------------- folders and lists
def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would pass it back: plain for local files, with protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def folder_source(root: str) -> ImageSource:
    """Every image under `root` (a `class/*.jpg` tree), sorted by relative path.

    id = the path relative to root ('cat/0001.jpg'); label = the first folder under root (None for
    images directly in root). Hidden files and other extensions are ignored.
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise InputError(f"source.path: folder {root!r} does not exist (expected a folder of class sub-folders)")
    base = base.rstrip("/")
    records = []
    for p in sorted(fs.find(base)):
        rel = posixpath.relpath(p, base) if isinstance(fs, LocalFileSystem) else p[len(base) :].lstrip("/")
        rel = rel.replace("\\", "/")
        if not _is_image_name(rel) or any(part.startswith(".") for part in rel.split("/")):
            continue
        label = rel.split("/")[0] if "/" in rel else None
        records.append(ImageRecord(id=rel, path=_url(fs, p), label=label))
    if not records:
        raise InputError(f"{root!r}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return ImageSource(tuple(records), description=f"folder {root!r}")


def _resolve_in(base: str, entry: str, list_path: str, line: int) -> tuple[str, str]:
    """(relative id, absolute path) of a list entry; InputError when it leaves `base`."""
    entry = entry.strip().replace("\\", "/")
    full = posixpath.normpath(entry if posixpath.isabs(entry) else posixpath.join(base, entry))
    rel = posixpath.relpath(full, base)
    if "://" in entry or rel == ".." or rel.startswith("../") or posixpath.isabs(rel):
        raise InputError(
            f"{list_path}, line {line}: path {entry!r} points outside the list's folder {base!r}; "
            "entries must be files inside it"
        )
    return rel, full


def filelist_source(path: str) -> ImageSource:
    """Images named in a list file, in file order.

    `.csv`: a header with a `path` column and an optional `label` column; any other extension: one
    path per line (blank lines and lines starting with '#' skipped). Relative paths resolve against
    the list's folder and no path may escape it. id = the path relative to that folder.
    """
    fs, lpath = fsspec.core.url_to_fs(path)
    if not fs.isfile(lpath):
        raise InputError(f"source.path: file list {path!r} does not exist")
    base = posixpath.dirname(posixpath.normpath(lpath.replace("\\", "/"))) or "."
    with fs.open(lpath, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    entries: list[tuple[int, str, str | None]] = []  # (line number, path, label)
    if lpath.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise InputError(f"{path}: CSV header must have a 'path' column (and optionally 'label'), got {fields}")
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                continue
            entries.append((reader.line_num, row["path"], row.get("label") or None))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((n, line, None))
    records = []
    for n, entry, label in entries:
        rel, full = _resolve_in(base, entry, path, n)
        records.append(ImageRecord(id=rel, path=_url(fs, full), label=label))
    return ImageSource(tuple(records), description=f"file list {path!r}")


def source_from_config(cfg: SourceConfig) -> ImageSource:
    """The source a `SourceConfig` describes (an evenly spaced subset when `limit` is set)."""
    if cfg.kind == "demo":
        src = demo_source(cfg.label_level)
    elif cfg.kind == "folder":
        src = folder_source(str(cfg.path))
    elif cfg.kind == "filelist":
        src = filelist_source(str(cfg.path))
    else:
        raise InputError(f"source.kind: expected 'demo', 'folder' or 'filelist', got {cfg.kind!r}")
    return subset(src, cfg.limit) if cfg.limit else src


def subset(src: ImageSource, limit: int) -> ImageSource:
    """`limit` evenly spaced records of a source (all of it when it is smaller); stable order."""
    if limit >= len(src):
        return src
    rows = np.linspace(0, len(src) - 1, limit).round().astype(int)
    return ImageSource(tuple(src.records[i] for i in rows), f"{src.description} (every ~{len(src) / limit:.1f}th, {limit})")


# ----------------------------------------------------------------------------- decoding
def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode → 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif mode == "I" and a.size and a.max() <= 255:
            pass  # 8-bit values stored as 32-bit ints
        else:
            a = a / 257.0  # 16-bit range → 8-bit
        return PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str) -> PIL.Image.Image:
    """Decode one image file (path or fsspec URL) to an RGB PIL image of 8 bits per channel.

    EXIF orientation is applied. Raises `InputError` naming the file for a missing, zero-byte,
    truncated or non-image file.
    """
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: image file does not exist") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read image file: {err}") from None
    if not data:
        raise InputError(f"{path}: image file is empty (0 bytes)")
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except PIL.Image.UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"{path}: truncated or corrupt image: {err}") from None
    except PIL.Image.DecompressionBombError as err:
        raise InputError(f"{path}: image too large to decode safely: {err}") from None
    try:
        img = PIL.ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 — a broken EXIF block should not lose the image
        log.warning("%s: ignoring unreadable EXIF orientation: %s", path, err)
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot convert image of mode {img.mode!r} to RGB: {err}") from None

"""Robust reading and decoding of the images a source names.

`load_image` turns any common file into an 8-bit RGB PIL image (EXIF orientation applied, alpha
composited on white, palette/CMYK/16-bit converted) or raises `InputError` naming the file and why;
it is `read_image_bytes` then `decode_image_bytes`, which the embed stage also calls apart when JPEGs
are decoded on the GPU (`is_plain_jpeg` says which bytes a plain JPEG decoder gets right).
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

from alignet_core.errors import InputError
from alignet_core.io import limits, store
from alignet_core.io.tar_shards import TAR_PREFIX, read_tar_member

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- decoding
def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image (h, w) → uint8 (h, w), 256 rows at a time, so the
    only full-size copy is the uint8 result (a 16-bit PNG never goes through a float64 image).

    16-bit values (and 32-bit integers above 255) map 0..65535 to 0..255 by round(v / 257), computed
    exactly in integers as (v + 128) // 257; floats in [0, 1] scale by 255, other floats are clipped."""
    if mode == "F":
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    elif mode == "I" and a.size and a.max() <= 255:
        scale = None  # 8-bit values stored as 32-bit ints
    else:
        scale = 0.0  # the 16-bit range
    out = np.empty(a.shape, np.uint8)
    for r in range(0, a.shape[0], 256):
        block = a[r:r + 256]
        if scale is None:
            out[r:r + 256] = np.clip(block, 0, 255)
        elif scale == 0.0:
            out[r:r + 256] = np.clip((block.astype(np.int64) + 128) // 257, 0, 255)
        else:
            out[r:r + 256] = np.clip(np.rint(block.astype(np.float64) * scale), 0, 255)
    return out


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode → 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return PIL.Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def read_image_bytes(path: str) -> bytes:
    """The bytes of one image file (path, fsspec URL or `tar://<member>::<shard>` reference).

    Raises `InputError` naming the file when it is missing, unreadable or empty (0 bytes).
    """
    try:
        if path.startswith(TAR_PREFIX):
            data = read_tar_member(path)
        else:
            fs, fpath = store.url_to_fs(path)
            limits.check_image_size(fs.size(fpath), path)
            with fs.open(fpath, "rb") as f:
                data = f.read(limits.MAX_IMAGE_BYTES + 1)
                limits.check_image_size(len(data), path)
    except FileNotFoundError:
        raise InputError(f"{path}: image file does not exist") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read image file: {err}") from None
    if not data:
        raise InputError(f"{path}: image file is empty (0 bytes)")
    return data


def decode_image_bytes(data: bytes, path: str) -> PIL.Image.Image:
    """Decode the bytes of the image file `path` to an RGB PIL image of 8 bits per channel.

    EXIF orientation is applied. Raises `InputError` naming `path` for truncated, corrupt,
    too large or non-image bytes.
    """
    try:
        with warnings.catch_warnings():
            # over PIL's pixel limit (MAX_IMAGE_PIXELS, ~89 Mpx) is refused, not just warned about
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(io.BytesIO(data))
            img.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
        raise InputError(f"{path}: image too large to decode safely: {err}") from None
    except PIL.Image.UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"{path}: truncated or corrupt image: {err}") from None
    try:
        img = PIL.ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 — a broken EXIF block should not lose the image
        log.warning("%s: ignoring unreadable EXIF orientation: %s", path, err)
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot convert image of mode {img.mode!r} to RGB: {err}") from None


def load_image(path: str) -> PIL.Image.Image:
    """Decode one image file (path or fsspec URL) to an RGB PIL image of 8 bits per channel.

    `path` may also be a tar member reference `tar://<member>::<shard url>` (see `tar_source`).
    EXIF orientation is applied. Raises `InputError` naming the file for a missing, zero-byte,
    truncated or non-image file.
    """
    return decode_image_bytes(read_image_bytes(path), path)


_EXIF_ORIENTATION = 0x0112


def is_plain_jpeg(data: bytes) -> bool:
    """True when `data` is a whole JPEG that a plain JPEG decoder turns into the pixels `decode_image_bytes` gives.

    That is: JPEG magic at the start and the end-of-image marker at the very end (a truncated file
    fails here instead of decoding to a grey-padded picture), 1 (gray) or 3 (YCbCr/RGB) components
    (CMYK/YCCK excluded: its RGB conversion differs between decoders), no EXIF rotation (device
    decoders ignore it) and within PIL's pixel limit. Only the header is parsed. Anything else is left
    to `decode_image_bytes`, which then decodes it or raises the same `InputError` as always.
    """
    if not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:  # header only: no pixels decoded
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return False
                return img.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 — any doubt: the PIL path decides (and reports) instead
        return False

"""Human feature-importance maps as data: ClickMe-style TFRecord shards, folders of PNG/NPY maps
joined to images by id, and the demo's proxy maps.

Maps are blurred as the reference (`harmonization` 0.0.9, `common/clickme_dataset.py`,
`common/blur.py`) does for ClickMe: bilinear resize to 64×64, a 10×10 Gaussian of σ = 10 (its
offset grid −5…4 and TensorFlow 'SAME' zero padding kept), bilinear resize to the wanted size
(TensorFlow 2's resize = half-pixel centres, no antialias = torch's `align_corners=False`).

The demo's maps are a **proxy**: the blurred alpha silhouette of each shipped emoji. It says
where the object is, nothing about which of its parts humans find diagnostic; every report that
shows numbers on it names it `PROXY_NAME`.

Bad records and files are skipped and counted by reason (`MapReport`), never fatal.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from alignet_core.errors import InputError
from alignet_core.io import limits
from alignet_core.io.images import read_image_bytes
from alignet_core.io.sources import ImageSource
from alignet_core.io.tfrecord import CorruptRecord, parse_example, read_records

log = logging.getLogger(__name__)

PROXY_NAME = "proxy maps: blurred alpha silhouettes of the emoji (where the object is, not what humans find diagnostic)"
CLICKME_SIZE = 256
BLUR_GRID = 64
BLUR_KERNEL_SIZE = 10
BLUR_SIGMA = 10.0


@dataclass
class MapReport:
    """How many maps were read, and how many were skipped, by reason."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "skipped": dict(self.skipped), "n_skipped": int(sum(self.skipped.values()))}


def gaussian_kernel(size: int = BLUR_KERNEL_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """The reference's (size, size) Gaussian, normalised to sum 1: rows for y = (size−1)//2 … ,
    columns for x = −(size−1)//2 … (for size 10: x −5…4, y 4…−5, as `tf.range` makes them)."""
    lo, hi = (-(size - 1)) // 2, (size - 1) // 2  # Python's floor division, as the reference's
    xs = torch.arange(lo, hi + 1, dtype=torch.float64)
    ys = torch.arange(hi, lo - 1, -1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    k = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """maps (b, H, W) cross-correlated with kernel (k, k), TensorFlow 'SAME' zero padding (stride 1)."""
    k = kernel.shape[-1]
    before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
    x = F.pad(maps[:, None], (before, after, before, after))
    return F.conv2d(x, kernel.to(maps)[None, None])[:, 0]


def resize_bilinear(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """maps (b, H, W) → (b, size, size) (or (b, *size)), bilinear with half-pixel centres and no
    antialias (tf.image.resize)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def blur_map(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The reference's heatmap preprocessing: (b, H, W) float → resize to 64×64, Gaussian blur
    (10×10, σ 10), resize to (b, size, size) (or (b, *size)). float32."""
    x = resize_bilinear(maps.float(), BLUR_GRID)
    x = gaussian_blur(x, gaussian_kernel())
    return resize_bilinear(x, size)


# ----------------------------------------------------------------------------- ClickMe records
@dataclass
class ClickMe:
    """ClickMe-style examples: images (n, 3, size, size) float32 in 0…255 (bilinear from 256×256,
    as the reference), heatmaps (n, size, size) float32 (blurred), labels (n,) int64."""

    images: torch.Tensor
    heatmaps: torch.Tensor
    labels: torch.Tensor
    report: MapReport


def _decode_jpeg(data: bytes, channels: int) -> np.ndarray | None:
    """JPEG bytes → (256, 256, channels) uint8, or None if undecodable or of another shape."""
    try:
        img = PIL.Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            return None
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError):
        return None
    a = np.asarray(img)
    a = a[:, :, None] if a.ndim == 2 else a
    if a.shape != (CLICKME_SIZE, CLICKME_SIZE, channels):
        return None
    return a


def _clickme_example(record: bytes, report: MapReport) -> tuple[np.ndarray, np.ndarray, int] | None:
    try:
        ex = parse_example(record)
    except (ValueError, UnicodeDecodeError):
        report.skip("malformed Example")
        return None
    image, heatmap, label = ex.get("image"), ex.get("heatmap"), ex.get("label")
    if not image or not heatmap or not isinstance(image[0], bytes) or not isinstance(heatmap[0], bytes):
        report.skip("missing image or heatmap")
        return None
    if not label or not isinstance(label[0], int):
        report.skip("missing label")
        return None
    img = _decode_jpeg(image[0], 3)
    if img is None:
        report.skip("image not a 256×256×3 JPEG")
        return None
    hm = _decode_jpeg(heatmap[0], 1)
    if hm is None:
        report.skip("heatmap not a 256×256×1 JPEG")
        return None
    return img, hm[:, :, 0], int(label[0])


def read_clickme(paths: Iterable[str], size: int = 224) -> ClickMe:
    """Every ClickMe-style example of the TFRecord shards `paths` (features 'image': 256×256 RGB
    JPEG, 'heatmap': 256×256 grayscale JPEG, 'label': int64), at `size`.

    Records with a bad CRC, a malformed Example, a missing feature, an undecodable JPEG or the
    wrong size are skipped and counted in `report.skipped`; a shard whose framing breaks is read
    up to the break (counted as 'torn or corrupt frame'). A missing shard is an InputError."""
    report = MapReport()
    images, maps, labels = [], [], []
    for path in paths:
        if not os.path.isfile(path.removeprefix("file://")):
            raise InputError(f"clickme shards: {path!r} does not exist")
        with open(path.removeprefix("file://"), "rb") as f:
            try:
                for rec in read_records(f, what=path):
                    if isinstance(rec, CorruptRecord):
                        report.skip("record CRC mismatch")
                        continue
                    got = _clickme_example(rec, report)
                    if got is not None:
                        images.append(got[0])
                        maps.append(got[1])
                        labels.append(got[2])
                        report.read += 1
            except InputError as err:
                log.warning("%s", err)
                report.skip("torn or corrupt frame")
    if not images:
        return ClickMe(torch.zeros(0, 3, size, size), torch.zeros(0, size, size), torch.zeros(0, dtype=torch.int64),
                       report)
    img = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    hm = blur_map(torch.from_numpy(np.stack(maps)).float(), size)
    log.info("clickme: %d examples read, skipped %s", report.read, dict(report.skipped))
    return ClickMe(img, hm, torch.tensor(labels, dtype=torch.int64), report)


# ----------------------------------------------------------------------------- maps of a source
def geometry_of(transform: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The resize and centre-crop steps of an image transform (torchvision Compose, as timm's eval
    transform), applied to maps (b, H, W) float, so that a map lands on the pixels its image does.
    Refuses a transform with other geometric steps (InputError)."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise InputError(f"importance maps: cannot read the geometry of transform {transform!r}")
    geo = []
    for t in steps:
        if isinstance(t, (T.Resize, T.CenterCrop)):
            geo.append(t)
        elif type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize", "PILToTensor", "MaybePILToTensor",
                                      "ConvertImageDtype"):
            raise InputError(f"importance maps: the image transform has a step {type(t).__name__} that maps cannot follow")

    def apply(maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for t in geo:
            x = t(x)
        return x

    return apply


def _alpha(path: str) -> np.ndarray | None:
    """The alpha channel (H, W) float32 in 0…1 of an image file, None without one."""
    img = PIL.Image.open(io.BytesIO(read_image_bytes(path)))
    img.load()
    if img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "RGBa", "La"):
        return None
    return np.array(img.getchannel("A"), dtype=np.float32) / 255.0


def _map_file(folder: str, image_id: str) -> np.ndarray | None | str:
    """The map of image_id in folder (<id>.npy or <id>.png) as (H, W) float32; None if there is none;
    a reason string if the file is bad."""
    base = os.path.join(folder, image_id)
    if os.path.isfile(base + ".npy"):
        try:
            with open(base + ".npy", "rb") as f:
                if os.fstat(f.fileno()).st_size > limits.MAX_IMAGE_BYTES:
                    return f"a .npy over {limits.MAX_IMAGE_BYTES >> 20} MiB"
                limits.check_npy(f, base + ".npy")  # its header's size must be what it holds: before allocating
                a = np.load(f, allow_pickle=False)
        except InputError:
            return "a .npy whose header's size is not what it holds"
        except (OSError, ValueError):
            return "unreadable .npy"
        a = a[:, :, 0] if a.ndim == 3 and a.shape[-1] == 1 else a
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            return "map not a finite (H, W) array"
        return a.astype(np.float32)
    if os.path.isfile(base + ".png"):
        try:
            img = PIL.Image.open(base + ".png")
            img.load()
        except (OSError, SyntaxError, ValueError):
            return "undecodable PNG"
        return np.array(img.convert("F"), dtype=np.float32)
    return None


def source_maps(
    source: ImageSource,
    maps: str,
    transform: Callable,
    rows: Iterable[int] | None = None,
    blur: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, MapReport]:
    """Importance maps of the images of `source`, on the pixels `transform` gives its images.

    maps: 'proxy' (the emoji's alpha silhouettes, `PROXY_NAME`) or a folder of `<image id>.png` /
    `<image id>.npy` maps (any size; a map is resized to its image's size first). Each map is
    blurred as the reference does (`blur_map`, at the image's size) unless `blur` is False, then
    resized and cropped as its image is (`geometry_of`). rows: which source rows (default all).

    Returns (maps (n, H, W) float32, tokens (n,) float32: 1 where the image has a map, 0 where it
    has none or its file was bad (its map then all zeros), the report)."""
    if maps != "proxy" and not os.path.isdir(maps.removeprefix("file://")):
        raise InputError(f"distill.harmonize.maps: {maps!r} is neither 'proxy' nor an existing folder of maps")
    folder = maps.removeprefix("file://")
    geo = geometry_of(transform)
    rows = list(range(len(source))) if rows is None else [int(r) for r in rows]
    report = MapReport()
    out: list[torch.Tensor | None] = []
    for r in rows:
        rec = source.records[r]
        try:
            with PIL.Image.open(io.BytesIO(read_image_bytes(rec.path))) as img:
                w, h = img.size
            got: np.ndarray | None | str = _alpha(rec.path) if maps == "proxy" else _map_file(folder, rec.id)
        except (InputError, OSError, SyntaxError, ValueError) as err:
            log.debug("importance maps: %s: %s", rec.path, err)
            got = "unreadable image"
        if got is None:
            report.skip("no alpha channel" if maps == "proxy" else "no map file")
            out.append(None)
            continue
        if isinstance(got, str):
            report.skip(got)
            out.append(None)
            continue
        m = torch.from_numpy(got)[None]
        if blur:
            m = blur_map(m, (h, w))
        elif m.shape[-2:] != (h, w):
            m = resize_bilinear(m, (h, w))
        out.append(geo(m)[0])
        report.read += 1
    shape = next((m.shape for m in out if m is not None), None)
    if shape is None:
        raise InputError(f"distill.harmonize.maps: none of the {len(rows)} images has a map in {maps!r} "
                         f"(skipped: {dict(report.skipped)})")
    tokens = torch.tensor([0.0 if m is None else 1.0 for m in out])
    stacked = torch.stack([torch.zeros(shape) if m is None else m for m in out]).float()
    log.info("importance maps (%s): %d read, skipped %s", maps, report.read, dict(report.skipped))
    return stacked, tokens, report

"""The human odd-one-out data of a run: THINGS-format triplets (with optional choice probabilities
and an object ↔ image table), or, for the demo, the taxonomy-derived proxy (`human.make_proxy_triplets`).

The transform stage fits on the training triplets of `human.split_triplets`; distillation scores
the student on the same held-out triplets (`human_test_split`).
"""

from __future__ import annotations

import csv

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict

from alignet_core.config import PipelineConfig
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import formats, sources
from alignet_core.transform import human

PROXY_NAME = "taxonomy proxy (not human)"


class HumanData(BaseModel):
    """Odd-one-out triplets over objects, the object of each image and optional probabilities."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) int64, odd one in column 2
    probs: np.ndarray | None  # (t, 3) float over pairs [(0,1), (0,2), (1,2)]
    object_of_image: np.ndarray  # (n,) int64, -1 for images of no object
    n_objects: int
    is_proxy: bool

    def name(self, cfg: PipelineConfig) -> str:
        """How reports name the data: the proxy is always called a proxy."""
        return PROXY_NAME if self.is_proxy else str(cfg.human.triplets)


def load_human_data(cfg: PipelineConfig, src: sources.ImageSource) -> HumanData:
    """Read THINGS-format triplets (or make the demo's taxonomy proxy when none are given)."""
    h = cfg.human
    n = len(src)
    if h.triplets is None:
        if cfg.source.kind != "demo":
            raise ConfigError("human.triplets: a triplet file is required unless source.kind is 'demo'")
        by_id = {m["id"]: m for m in sources.demo_metadata()}
        meta = [by_id[i] for i in src.ids().tolist()]
        fine = np.unique([m[h.proxy_level] for m in meta], return_inverse=True)[1]
        coarse = np.unique([m["category"] for m in meta], return_inverse=True)[1]
        coarse_arg = None if h.proxy_level == "category" else coarse
        trip, probs = human.make_proxy_triplets(fine, coarse_arg, h.proxy_n_triplets, h.proxy_noise, cfg.seed)
        return HumanData(triplets=trip, probs=probs, object_of_image=np.arange(n), n_objects=n, is_proxy=True)
    if h.objects is None:
        object_of_image, n_objects = np.arange(n), n
    else:
        object_of_image, n_objects = read_objects_table(h.objects, src)
    trip = formats.read_things_triplets(h.triplets, n_objects)
    probs = formats.read_probabilities(h.probabilities, len(trip)) if h.probabilities else None
    return HumanData(triplets=trip, probs=probs, object_of_image=object_of_image, n_objects=n_objects, is_proxy=False)


def read_objects_table(url: str, src: sources.ImageSource) -> tuple[np.ndarray, int]:
    """CSV `object,image_id`: object ids 0..m-1, image ids as in the source.
    Returns (object_of_image (n,) int64 with -1 for images of no object, m)."""
    index = {i: r for r, i in enumerate(src.ids().tolist())}
    object_of_image = np.full(len(src), -1, dtype=np.int64)
    try:
        with fsspec.open(url, "r") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise InputError(f"human.objects: file {url!r} does not exist") from None
    for line, row in enumerate(rows, start=2):
        try:
            obj, img = int(row["object"]), row["image_id"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{url}: line {line}: expected columns 'object' (int) and 'image_id'") from None
        if img not in index:
            raise InputError(f"{url}: line {line}: image_id {img!r} is not in the image source")
        object_of_image[index[img]] = obj
    n_objects = int(object_of_image.max()) + 1 if len(rows) else 0
    return object_of_image, n_objects


class HumanTest(BaseModel):
    """Held-out human (or proxy) triplets over objects, for zero-shot odd-one-out accuracy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) object ids, odd one in column 2
    object_of_image: np.ndarray  # (n,) object id of each image, -1 for none
    is_proxy: bool


def human_test_split(cfg: PipelineConfig, src: sources.ImageSource) -> HumanTest | None:
    """The held-out human triplets of the transform stage (same split), or None without human data."""
    if cfg.human.triplets is None and cfg.source.kind != "demo":
        return None
    data = load_human_data(cfg, src)
    _, va = human.split_triplets(len(data.triplets), cfg.transform.val_fraction, cfg.seed)
    return HumanTest(triplets=data.triplets[va], object_of_image=data.object_of_image, is_proxy=data.is_proxy)

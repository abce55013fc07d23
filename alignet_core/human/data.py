"""The human odd-one-out data of a run: THINGS-format triplets (with optional choice probabilities,
their objects attached to images by a declared, checked mapping: `objects.py`), or, for the demo, the taxonomy proxy (`human.make_proxy_triplets`),
split into object-disjoint roles. Without a triplet file, the taxonomy proxy of any labelled source
(`proxy_taxonomy`) stands in, named a proxy wherever its figures appear.

The objects are dealt into `human.folds` folds (seeded by the run's seed); the test fold
(`human.test_fold`) is held out of every fit and is the only one any reported human figure uses,
the validation fold (the next one) chooses epochs and settings, the other folds train. A file's
triplets keep the role all their objects share (the others are counted and dropped); proxy
triplets are drawn inside each role, in proportion to its objects, so the split wastes none.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict

from alignet_core.config import PipelineConfig
from alignet_core.errors import ConfigError, InputError
from alignet_core.human import triplets as human
from alignet_core.human.mapping import MappingSummary, object_mapping
from alignet_core.human.triplets import TripletSplit
from alignet_core.io import formats, sources

log = logging.getLogger(__name__)

PROXY_NAME = "taxonomy proxy (not human)"
ROLES = ("train", "val", "test")


class HumanData(BaseModel):
    """Odd-one-out triplets over objects, their object-disjoint split, the object of each image and
    optional choice probabilities."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) int64, odd one in column 2
    probs: np.ndarray | None  # (t, 3) float over pairs [(0,1), (0,2), (1,2)]
    object_of_image: np.ndarray  # (n,) int64, -1 for images of no object
    n_objects: int
    fold_of: np.ndarray  # (n_objects,) int64 fold of each object
    split: TripletSplit  # rows of `triplets` by role
    level_of: np.ndarray | None  # (t,) str abstraction level of each proxy triplet; None for files
    is_proxy: bool
    mapping: MappingSummary | None = None  # how a file's objects attach to images; None for the proxy

    def name(self, cfg: PipelineConfig) -> str:
        """How reports name the data: the proxy is always called a proxy."""
        return PROXY_NAME if self.is_proxy else str(cfg.human.triplets)


def taxonomy(cfg: PipelineConfig, src: sources.ImageSource) -> tuple[np.ndarray, np.ndarray] | None:
    """(coarse, fine) labels of the source's images in source order — the demo's category and
    subcategory, a CSV file list's two `source.label_columns` — or None for a source without a
    two-level taxonomy."""
    if cfg.source.kind != "demo":
        return src.taxonomy()
    by_id = {m["id"]: m for m in sources.demo_metadata()}
    meta = [by_id[i] for i in src.ids().tolist()]
    return (np.asarray([m["category"] for m in meta], dtype=str), np.asarray([m["subcategory"] for m in meta], dtype=str))


ONE_CATEGORY = "(all)"  # the coarse label of every image of a one-level source, for the proxy


def proxy_taxonomy(cfg: PipelineConfig, src: sources.ImageSource) -> tuple[np.ndarray, np.ndarray] | None:
    """The (coarse, fine) labels the taxonomy proxy draws from: the two-level taxonomy (`taxonomy`), else,
    when every image has a class label (class folders, one CSV label column, tar labels), each image's
    class under one category, so only class-level triplets (local, class_boundary) can be drawn. None
    when some image has no label (a flat folder): no proxy can stand in for human data there."""
    two = taxonomy(cfg, src)
    if two is not None:
        return two
    labels = src.labels()
    if (labels == "").any():
        return None
    return np.full(len(labels), ONE_CATEGORY), labels


def no_human_data_message(src: sources.ImageSource) -> str:
    """Why a source without a triplet file has no human data, and the fixes."""
    unlabelled = int((src.labels() == "").sum())
    return (f"human.triplets: a THINGS-format triplet file is required: {unlabelled} of the {len(src)} images of "
            f"{src.description} have no label (a flat folder has none), so no taxonomy proxy can stand in for human "
            "data; give human.triplets, label the images (class folders, source.label_columns of a CSV list, source.labels of imported embeddings), or set "
            "transform.enabled: false")


def load_human_data(cfg: PipelineConfig, src: sources.ImageSource) -> HumanData:
    """Read THINGS-format triplets (or, when none are given, make the taxonomy proxy from the source's
    labels) and split them by objects."""
    h = cfg.human
    n = len(src)
    if h.triplets is None:
        labels = proxy_taxonomy(cfg, src)
        if labels is None:
            raise ConfigError(no_human_data_message(src))
        return _proxy(cfg, labels, n)
    mapping = object_mapping(h, cfg.source, src)
    file_trip = formats.read_things_triplets(h.triplets, mapping.summary.n_declared)
    probs = formats.read_probabilities(h.probabilities, len(file_trip)) if h.probabilities else None
    kept, trip = mapping.map_triplets(file_trip)
    if probs is not None:
        probs = probs[kept]
    summary = mapping.summary.model_copy(update={"triplets_in_file": len(file_trip), "triplets_kept": len(kept)})
    for line in summary.lines():
        log.info("%s", line)
    if len(trip) == 0:
        raise InputError(f"human.triplets: none of the {len(file_trip)} triplets has all three objects among the "
                         f"{summary.n_objects} objects with images ({summary.kind})")
    n_objects = summary.n_objects
    object_of_image = mapping.object_of_image
    fold_of = human.object_folds(n_objects, h.folds, cfg.seed)
    split = human.split_by_objects(trip, fold_of, h.test_fold, h.val_fold)
    log.info("human triplets: %d over %d objects; object-disjoint roles: %d train, %d validation, %d test, "
             "%d dropped (objects in two roles)", len(trip), n_objects, len(split.train), len(split.val),
             len(split.test), split.n_mixed)
    for role in ("val", "test"):
        if len(getattr(split, role)) == 0:
            raise InputError(f"human.triplets: no triplet has all three objects in the {role} fold of {h.folds}; "
                             "with a fixed file only about 1/folds³ of the triplets survive: use fewer human.folds "
                             "or more triplets")
    return HumanData(triplets=trip, probs=probs, object_of_image=object_of_image, n_objects=n_objects,
                     fold_of=fold_of, split=split, level_of=None, is_proxy=False, mapping=summary)


def _proxy(cfg: PipelineConfig, labels: tuple[np.ndarray, np.ndarray], n: int) -> HumanData:
    """The taxonomy proxy (objects = images), drawn role by role over each role's own objects."""
    h = cfg.human
    coarse, fine = labels
    fold_of = human.object_folds(n, h.folds, cfg.seed)
    pools = {"train": np.flatnonzero((fold_of != h.test_fold) & (fold_of != h.val_fold)),
             "val": np.flatnonzero(fold_of == h.val_fold), "test": np.flatnonzero(fold_of == h.test_fold)}
    counts = human.apportion({role: len(pool) for role, pool in pools.items()}, h.proxy_n_triplets)
    parts, rows, start = [], {}, 0
    for r, role in enumerate(ROLES):
        t, p, lv = human.make_proxy_triplets(coarse, fine, h.proxy_mix, counts[role], h.proxy_noise,
                                             seed=cfg.seed * 1000 + r, pool=pools[role])
        parts.append((t, p, lv))
        rows[role] = np.arange(start, start + len(t))
        start += len(t)
    split = TripletSplit(train=rows["train"], val=rows["val"], test=rows["test"], n_mixed=0)
    return HumanData(triplets=np.concatenate([x[0] for x in parts]), probs=np.concatenate([x[1] for x in parts]),
                     object_of_image=np.arange(n), n_objects=n, fold_of=fold_of, split=split,
                     level_of=np.concatenate([x[2] for x in parts]), is_proxy=True)


class HumanTest(BaseModel):
    """The held-out (test-fold) human triplets over objects, for zero-shot odd-one-out accuracy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) object ids, odd one in column 2; every object in the test fold
    probs: np.ndarray | None  # (t, 3) human choice probabilities, when known
    object_of_image: np.ndarray  # (n,) object id of each image, -1 for none
    is_proxy: bool


def human_data_or_none(cfg: PipelineConfig, src: sources.ImageSource) -> HumanData | None:
    """The run's human data (the taxonomy proxy without a file), or None when there is none."""
    if cfg.human.triplets is None and proxy_taxonomy(cfg, src) is None:
        return None
    return load_human_data(cfg, src)


def human_test_split(data: HumanData | None) -> HumanTest | None:
    """The test-fold human triplets of the run's human data (the transform's split), or None without any."""
    if data is None:
        return None
    te = data.split.test
    return HumanTest(triplets=data.triplets[te], probs=None if data.probs is None else data.probs[te],
                     object_of_image=data.object_of_image, is_proxy=data.is_proxy)

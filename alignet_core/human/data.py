"""The human odd-one-out data of a run: THINGS-format triplets (with optional choice probabilities,
their objects attached to images by a declared, checked mapping: `objects.py`), or, for the demo, the taxonomy proxy (`human.make_proxy_triplets`),
split by objects. Without a triplet file, the taxonomy proxy of any labelled source
(`proxy_taxonomy`) stands in, named a proxy wherever its figures appear.

The objects are dealt into `human.folds` folds (seeded by the run's seed). The transform stage
rotates the held-out fold through all of them (`HumanData.fold_split`): each rotation trains on the
triplets with no object in its fold and is scored on those with all three there, and the held-out
figures pool the k rotations. `split` is the designated test fold's (`human.test_fold`): the
triplets the held-out teacher never saw a trace of (`split.test`, what evaluate and distill score)
and those it trained on (`split.train`). A file's triplets with one or two objects in a fold serve
neither role of that rotation (`partial`: a secondary figure). Proxy triplets are drawn inside each
fold, in proportion to its objects, so every fold has test triplets and no proxy triplet is partial.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict

from alignet_core.config import PipelineConfig
from alignet_core.config.human import HumanConfig
from alignet_core.errors import ConfigError, InputError
from alignet_core.human import triplets as human
from alignet_core.human.levels import admits
from alignet_core.human.mapping import MappingSummary, ObjectMapping, object_mapping
from alignet_core.human.things import things_dir
from alignet_core.human.triplets import TripletSplit
from alignet_core.io import formats, sources

log = logging.getLogger(__name__)

PROXY_NAME = "taxonomy proxy (not human)"
#: in the transform stage's folder (`human.densify`): every fold's test triplets (object ids of the run's objects
#: with images, odd one sampled into column 2) and their choice probabilities from VICE fitted on every trial
DENSE_TEST_FILE = "dense_test.txt"
DENSE_TEST_PROBS = "dense_test_probabilities.npy"
SHIPPED_NAME = "THINGS odd-one-out trials shipped with alignet (Hebart et al. 2020, CC-BY-4.0)"


def trial_file(h: HumanConfig) -> str | None:
    """The triplet file of the human data: `human.triplets`, the shipped THINGS trials (`human.shipped`), or
    None (the taxonomy proxy)."""
    if h.shipped == "things":
        return str(things_dir() / "triplets.txt")
    return h.triplets


def human_files(h: HumanConfig) -> dict[str, str]:
    """field → file of every file that changes the human data (what a stage's key hashes by content)."""
    files = {f: getattr(h, f) for f in ("triplets", "probabilities", "objects", "concepts", "stimuli") if getattr(h, f)}
    if h.shipped == "things":
        files.update({f"shipped_{n}": str(things_dir() / n) for n in ("triplets.txt", "concepts.txt", "emoji_map.csv")})
    return files


class HumanData(BaseModel):
    """Odd-one-out triplets over objects, their object-disjoint split, the object of each image and
    optional choice probabilities."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    triplets: np.ndarray  # (t, 3) int64, odd one in column 2
    probs: np.ndarray | None  # (t, 3) float over pairs [(0,1), (0,2), (1,2)]
    object_of_image: np.ndarray  # (n,) int64, -1 for images of no object
    n_objects: int
    fold_of: np.ndarray  # (n_objects,) int64 fold of each object
    split: TripletSplit  # rows of `triplets` by their objects' relation to the designated test fold
    level_of: np.ndarray | None  # (t,) str abstraction level of each proxy triplet; None for files
    is_proxy: bool
    mapping: MappingSummary | None = None  # how a file's objects attach to images; None for the proxy
    # with human.densify: every trial of the file (declared object ids), the declared id of each object, and
    # the number of declared objects (VICE embeds all of them); `triplets` are then the trials over objects
    # with images (real choices: a secondary figure), and the fits train on VICE's dense triplets
    trials: np.ndarray | None = None
    declared_of: np.ndarray | None = None
    n_declared: int = 0

    @property
    def dense(self) -> bool:
        """Whether the transform fits on VICE's dense triplets (`human.densify`) rather than `triplets`."""
        return self.trials is not None

    def name(self, cfg: PipelineConfig) -> str:
        """How reports name the data: the proxy is always called a proxy."""
        if self.is_proxy:
            return PROXY_NAME
        base = SHIPPED_NAME if cfg.human.shipped else str(cfg.human.triplets)
        return f"{base}, densified by VICE" if self.dense else base

    @property
    def n_folds(self) -> int:
        return int(self.fold_of.max()) + 1 if len(self.fold_of) else 0

    def fold_split(self, fold: int) -> TripletSplit:
        """The rows of `triplets` by their objects' relation to `fold` (one rotation of the k folds)."""
        return human.split_by_objects(self.triplets, self.fold_of, fold)


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
    url = trial_file(h)
    if url is None:
        labels = proxy_taxonomy(cfg, src)
        if labels is None:
            raise ConfigError(no_human_data_message(src))
        return _proxy(cfg, labels, n)
    if h.objects is not None:  # a table declares no object count: the file's objects beyond it have no image
        file_trip = formats.read_things_triplets(url)
        mapping = object_mapping(h, cfg.source, src, int(file_trip.max()) + 1 if len(file_trip) else 0)
    else:
        mapping = object_mapping(h, cfg.source, src)
        file_trip = formats.read_things_triplets(url, mapping.summary.n_declared)
    probs = formats.read_probabilities(h.probabilities, len(file_trip)) if h.probabilities else None
    kept, trip = mapping.map_triplets(file_trip)
    if probs is not None:
        probs = probs[kept]
    summary = mapping.summary.model_copy(update={"triplets_in_file": len(file_trip), "triplets_kept": len(kept)})
    for line in summary.lines():
        log.info("%s", line)
    if h.densify is not None:
        return _dense(cfg, file_trip, trip, mapping, summary)
    if len(trip) == 0:
        raise InputError(f"human.triplets: none of the {len(file_trip)} triplets has all three objects among the "
                         f"{summary.n_objects} objects with images ({summary.kind})")
    n_objects = summary.n_objects
    object_of_image = mapping.object_of_image
    fold_of = human.object_folds(n_objects, h.folds, cfg.seed)
    splits = human.fold_splits(trip, fold_of, h.folds)
    split = splits[h.test_fold]
    n_test = sum(len(sp.test) for sp in splits)
    log.info("human triplets: %d over %d objects in %d folds; per rotation %.1f%% train on average, %d test "
             "triplets over all folds (%.1f%%: all three objects in one fold), the rest partial (secondary only)",
             len(trip), n_objects, h.folds, 100.0 * np.mean([len(sp.train) for sp in splits]) / len(trip), n_test,
             100.0 * n_test / len(trip))
    empty = [f for f, sp in enumerate(splits) if len(sp.test) == 0 or len(sp.train) == 0]
    if empty:
        raise InputError(f"human.triplets: fold(s) {empty} of {h.folds} have no triplet with all three objects in "
                         "the fold (or none with no object in it); with a fixed file only about 1/folds² of the "
                         "triplets are test triplets over all folds: use fewer human.folds or more triplets")
    return HumanData(triplets=trip, probs=probs, object_of_image=object_of_image, n_objects=n_objects,
                     fold_of=fold_of, split=split, level_of=None, is_proxy=False, mapping=summary)


def _dense(cfg: PipelineConfig, file_trip: np.ndarray, trip: np.ndarray, mapping: ObjectMapping,
           summary: MappingSummary) -> HumanData:
    """`human.densify`: every trial is kept for VICE; the objects with images are dealt into folds (each fold's
    VICE and transform never see a trial naming one of its objects); the real trials over objects with
    images stay as `triplets` (a secondary, real-choice figure: few, and folds may have none)."""
    h = cfg.human
    n_objects = summary.n_objects
    if h.objects is not None and summary.n_unknown:
        raise InputError(f"human.objects: {h.objects}: {summary.n_unknown} image id(s) the map names are not in the "
                         f"image source, e.g. {summary.unknown[:3]}: with human.densify every mapped object's images "
                         "must be there (fix the ids, or drop those rows)")
    if n_objects < 3 * h.folds:
        raise InputError(f"human.densify: {n_objects} objects have images; {h.folds} folds need at least 3 each "
                         "(use fewer human.folds or map more objects to images)")
    fold_of = human.object_folds(n_objects, h.folds, cfg.seed)
    declared_of = np.flatnonzero(mapping.compact_of >= 0).astype(np.int64)
    split = human.split_by_objects(trip, fold_of, h.test_fold)
    log.info("human.densify: VICE on all %d trials over %d objects; dense triplets over the %d objects with images "
             "in %d folds; %d trials name three of them (%d with all three in the test fold)", len(file_trip),
             summary.n_declared, n_objects, h.folds, len(trip), len(split.test))
    return HumanData(triplets=trip, probs=None, object_of_image=mapping.object_of_image, n_objects=n_objects,
                     fold_of=fold_of, split=split, level_of=None, is_proxy=False, mapping=summary,
                     trials=file_trip, declared_of=declared_of, n_declared=summary.n_declared)


def _proxy(cfg: PipelineConfig, labels: tuple[np.ndarray, np.ndarray], n: int) -> HumanData:
    """The taxonomy proxy (objects = images), drawn fold by fold over each fold's own objects, so that
    every fold has test triplets and every triplet trains the k − 1 rotations that do not hold its
    fold out."""
    h = cfg.human
    coarse, fine = labels
    fold_of = human.object_folds(n, h.folds, cfg.seed)
    pools = [np.flatnonzero(fold_of == f) for f in range(h.folds)]
    # a fold whose few objects admit no level of the mix gets no triplets (its objects are then tested by no fold)
    sizes = {str(f): len(pool) if any(w and admits(coarse, fine, lv, pool) for lv, w in h.proxy_mix.items()) else 0
             for f, pool in enumerate(pools)}
    if not sum(sizes.values()):
        sizes = {str(f): len(pool) for f, pool in enumerate(pools)}  # make_proxy_triplets names the problem
    elif empty := [f for f, n in sizes.items() if n == 0]:
        log.warning("taxonomy proxy: fold(s) %s of %d admit none of the levels %s (too few objects); they get no "
                    "triplets and their objects are in no held-out figure: use fewer human.folds or more images",
                    ", ".join(empty), h.folds, sorted(h.proxy_mix))
    counts = human.apportion(sizes, h.proxy_n_triplets)
    parts = [human.make_proxy_triplets(coarse, fine, h.proxy_mix, counts[str(f)], h.proxy_noise,
                                       seed=cfg.seed * 1000 + f, pool=pool) for f, pool in enumerate(pools)]
    triplets = np.concatenate([x[0] for x in parts])
    return HumanData(triplets=triplets, probs=np.concatenate([x[1] for x in parts]), object_of_image=np.arange(n),
                     n_objects=n, fold_of=fold_of, split=human.split_by_objects(triplets, fold_of, h.test_fold),
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
    if trial_file(cfg.human) is None and proxy_taxonomy(cfg, src) is None:
        return None
    return load_human_data(cfg, src)


def human_test_split(data: HumanData | None) -> HumanTest | None:
    """The test-fold human triplets of the run's human data (the transform's split), or None without any."""
    if data is None:
        return None
    te = data.split.test
    return HumanTest(triplets=data.triplets[te], probs=None if data.probs is None else data.probs[te],
                     object_of_image=data.object_of_image, is_proxy=data.is_proxy)

"""The evaluation sets of a run: odd-one-out triplets no fit has seen.

- one set per abstraction level (`evaluate.levels`), drawn from the source's two-level taxonomy
  over the images of the human test fold's objects only, so no level triplet involves an object
  a fit (transform, VICE, search, early stopping) has seen; their odd one is the taxonomy's;
- `human`: the human (or proxy) triplets of the test fold, over objects (an object's embedding is
  the mean of its images'), with their choice probabilities when known;
- one set per `evaluate.sets` file: THINGS-format rows of image rows (0-based, in source order),
  'i j k' with k the odd one out, optionally a `.npy` (n, 3) of human choice probabilities of the
  pairs (i, j), (i, k), (j, k). Their objects may have been fitted: the file's provenance decides.

Level and human sets are resampled by object (image) for their intervals; file sets by triplet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.errors import InputError
from alignet_core.human.data import HumanData, taxonomy
from alignet_core.human.levels import admits, level_triplets
from alignet_core.io import formats, sources

LEVEL_DEFINITIONS = {
    "category_boundary": "two images of one category from different classes; the odd one from another category",
    "sibling_boundary": "three images of one category: two of one class, the odd one from a sibling class",
    "class_boundary": "two images of one class; the odd one from any other class",
}


@dataclass(frozen=True)
class EvalSet:
    """triplets (t, 3) int64, odd one in column 2: image rows, or object ids when `on_objects`;
    probs (t, 3) human choice probabilities or None; resample: 'objects' or 'triplets'."""

    name: str
    kind: str  # 'level', 'human' or 'file'
    triplets: np.ndarray
    probs: np.ndarray | None
    on_objects: bool
    resample: str
    definition: str


def images_of_test_fold(cfg: PipelineConfig, data: HumanData | None, n_images: int) -> np.ndarray:
    """Rows of the images whose object is in the test fold (all images without human data)."""
    if data is None:
        return np.arange(n_images)
    ooi = data.object_of_image
    return np.flatnonzero((ooi >= 0) & (data.fold_of[np.maximum(ooi, 0)] == cfg.human.test_fold))


def build_sets(cfg: PipelineConfig, src: sources.ImageSource, data: HumanData | None) -> list[EvalSet]:
    """Every evaluation set of the run (see the module doc), deterministic for the run's seed."""
    out: list[EvalSet] = []
    labels = taxonomy(cfg, src)
    if labels is not None:
        pool = images_of_test_fold(cfg, data, len(src))
        for i, level in enumerate(cfg.evaluate.levels):
            if not admits(*labels, level, pool):
                continue
            rng = np.random.default_rng([cfg.seed, 29, i])
            t = level_triplets(*labels, level, cfg.evaluate.n_per_level, rng, pool)
            out.append(EvalSet(name=level, kind="level", triplets=t, probs=None, on_objects=False,
                               resample="objects", definition=LEVEL_DEFINITIONS[level]))
    if data is not None:
        te = data.split.test
        out.append(EvalSet(name="human", kind="human", triplets=data.triplets[te],
                           probs=None if data.probs is None else data.probs[te], on_objects=True, resample="objects",
                           definition=f"the {data.name(cfg)} triplets of the test fold (objects never fitted)"))
    for s in cfg.evaluate.sets:
        t = formats.read_things_triplets(s.triplets, len(src))
        probs = formats.read_probabilities(s.probabilities, len(t)) if s.probabilities else None
        if s.name in {e.name for e in out}:
            raise InputError(f"evaluate.sets: the name {s.name!r} is taken; choose another")
        out.append(EvalSet(name=s.name, kind="file", triplets=t, probs=probs, on_objects=False, resample="triplets",
                           definition=f"triplets from {s.triplets}"))
    return out


def needed_images(sets: list[EvalSet], data: HumanData | None, with_train_objects: bool) -> np.ndarray:
    """Sorted image rows an evaluation embeds: every image of its sets (of their objects, for
    object sets), plus the training objects' images when temperatures are fitted on them."""
    rows = [s.triplets.ravel() for s in sets if not s.on_objects]
    objects = [s.triplets.ravel() for s in sets if s.on_objects]
    if data is not None and with_train_objects:
        objects.append(data.triplets[data.split.train].ravel())
    if objects and data is not None:
        rows.append(np.flatnonzero(np.isin(data.object_of_image, np.unique(np.concatenate(objects)))))
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)

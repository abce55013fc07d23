"""The evaluation sets of a run: odd-one-out triplets no fit has seen.

- one set per taxonomy level (`evaluate.levels`: category_boundary, sibling_boundary,
  class_boundary), drawn from the source's two-level taxonomy over the images of the human test
  fold's objects only, so no level triplet involves an object a fit (transform, VICE, search,
  early stopping) has seen; their odd one is the taxonomy's (taxonomy answer, ceiling 100%: not the
  AligNet paper's human-judged Levels, whose figures are never printed beside them);
- `human` (real human triplets) or `proxy` (the taxonomy proxy standing in for them): the test
  fold's triplets, over objects (an object's embedding is the mean of its images'), with their
  choice probabilities when known (for the proxy: its generator's, whence its noise ceiling);
- one set per `evaluate.sets` file: THINGS-format rows of image rows (0-based, in source order),
  'i j k' with k the odd one out, optionally a `.npy` (n, 3) of human choice probabilities of the
  pairs (i, j), (i, k), (j, k) (the per-triplet response distribution: every model's expected
  agreement with a person's choice is scored against it), and `paper_level` when the file is the
  AligNet paper's Levels data (its figures are then printed beside). Their objects may have been
  fitted: the file's provenance decides.

Level and human sets are resampled by object (image) for their intervals; file sets by triplet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.errors import InputError
from alignet_core.human.data import HumanData, taxonomy
from alignet_core.human.heldout import noise_ceiling
from alignet_core.human.levels import KIND, admits, level_triplets
from alignet_core.io import formats, sources

LEVEL_DEFINITIONS = {
    "category_boundary": f"two images of one category from different classes; the odd one from another category ({KIND})",
    "sibling_boundary": f"three images of one category: two of one class, the odd one from a sibling class ({KIND})",
    "class_boundary": f"two images of one class; the odd one from any other class ({KIND})",
}


@dataclass(frozen=True)
class EvalSet:
    """triplets (t, 3) int64, odd one in column 2: image rows, or object ids when `on_objects`;
    probs (t, 3) human choice probabilities or None; resample: 'objects' or 'triplets'."""

    name: str
    kind: str  # 'level', 'human', 'proxy' or 'file'
    triplets: np.ndarray
    probs: np.ndarray | None
    on_objects: bool
    resample: str
    definition: str
    ceiling: float | None = None  # the best accuracy possible: 1 for a taxonomy answer, the proxy's noise ceiling
    paper_level: str | None = None  # the AligNet paper's Levels subset a file set holds (`evaluate.sets[].paper_level`)


def images_of_test_fold(cfg: PipelineConfig, data: HumanData | None, n_images: int) -> np.ndarray:
    """Rows of the images whose object is in the test fold (all images without human data)."""
    if data is None:
        return np.arange(n_images)
    ooi = data.object_of_image
    return np.flatnonzero((ooi >= 0) & (data.fold_of[np.maximum(ooi, 0)] == cfg.human.test_fold))


DENSE_SET = "human_expected"
DENSE_DEFINITION = ("triplets drawn inside the test fold's objects, labelled by VICE fitted on every human trial (a "
                    "model of the people): each model's expected accuracy (the probability that a person picks its odd "
                    "one); ceiling: the mean of VICE's largest choice probability")


def build_sets(cfg: PipelineConfig, src: sources.ImageSource, data: HumanData | None,
               dense_test: tuple[np.ndarray, np.ndarray] | None = None) -> list[EvalSet]:
    """Every evaluation set of the run (see the module doc), deterministic for the run's seed. dense_test:
    (triplets, probs) of the transform's dense test triplets over every fold (`human.densify`)."""
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
                               resample="objects", definition=LEVEL_DEFINITIONS[level], ceiling=1.0))
    if data is not None:
        te = data.split.test
        probs = None if data.probs is None else data.probs[te]
        name = human_set_name(data)
        ceiling = noise_ceiling(probs) if data.is_proxy else None
        out.append(EvalSet(name=name, kind=name, triplets=data.triplets[te], probs=probs, on_objects=True,
                           resample="objects", ceiling=ceiling,
                           definition=f"the {data.name(cfg)} triplets of the test fold (objects never fitted)"
                           + ("" if ceiling is None else f"; noise ceiling {100 * ceiling:.1f}% (the proxy flips "
                              f"about {100 * cfg.human.proxy_noise:.0f}% of its answers at random)")
                           + ("; the real trials whose three objects are test-fold objects" if data.dense else "")))
    if data is not None and dense_test is not None:
        t, p = dense_test
        inside = (data.fold_of[t] == cfg.human.test_fold).all(1)
        out.append(EvalSet(name=DENSE_SET, kind="dense", triplets=t[inside], probs=p[inside], on_objects=True,
                           resample="objects", ceiling=float(p[inside].max(1).mean()) if inside.any() else None,
                           definition=DENSE_DEFINITION))
    for s in cfg.evaluate.sets:
        t = formats.read_things_triplets(s.triplets, len(src))
        probs = formats.read_probabilities(s.probabilities, len(t)) if s.probabilities else None
        if s.name in {e.name for e in out}:
            raise InputError(f"evaluate.sets: the name {s.name!r} is taken; choose another")
        out.append(EvalSet(name=s.name, kind="file", triplets=t, probs=probs, on_objects=False, resample="triplets",
                           definition=f"triplets from {s.triplets}"
                           + (f" (the AligNet paper's Levels, {s.paper_level})" if s.paper_level else ""),
                           paper_level=s.paper_level))
    return out


def human_set_name(data: HumanData) -> str:
    """The name of the test fold's set, and of its figures: `human` for people's triplets, `proxy` for the
    taxonomy proxy standing in for them."""
    return "proxy" if data.is_proxy else "human"


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

"""Which images the sampler leaves out so that the student's test-fold figures stay held-out.

With `human.teacher: heldout` (the default, evaluation) every image of an object in the human test
fold (`human.test_fold` of `HumanData.fold_of`, images attached by `HumanData.object_of_image`) is
ineligible for every sampled triplet, train and valid: the student never trains on an image its
held-out human and level figures are scored on. With `human.teacher: all` (publishing) the pool is
whole and the student's test-fold figures are reported as not held-out (`heldout_label`). Without
human data there is no test fold and nothing to leave out.
"""

from __future__ import annotations

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.human.data import HumanData

#: how reports label the student's (and the published teacher's) test-fold figures
HELD_OUT = "held-out (no test-fold image in any training triplet)"
NOT_HELD_OUT_ALL = "not held-out (the published teacher saw every triplet)"


def images_in_test_fold(cfg: PipelineConfig, data: HumanData | None) -> np.ndarray:
    """(m,) int64 sorted rows of the images whose object lies in the human test fold; empty without
    human data."""
    if data is None:
        return np.zeros(0, dtype=np.int64)
    ooi = np.asarray(data.object_of_image, dtype=np.int64)
    inside = (ooi >= 0) & (np.asarray(data.fold_of)[np.maximum(ooi, 0)] == cfg.human.test_fold)
    return np.flatnonzero(inside).astype(np.int64)


def excluded_images(cfg: PipelineConfig, data: HumanData | None) -> np.ndarray:
    """(m,) int64 rows the sampler must never draw: the test fold's images under `human.teacher:
    heldout`, none under `all` or without human data."""
    if cfg.human.teacher != "heldout":
        return np.zeros(0, dtype=np.int64)
    return images_in_test_fold(cfg, data)


def heldout_label(cfg: PipelineConfig, data: HumanData | None, trained_rows: np.ndarray,
                  own_dataset: bool) -> str:
    """How the student's test-fold figures are labelled: held-out only when no test-fold image is in
    its training triplets (`trained_rows`, any shape of image rows) and, for the pipeline's own
    dataset, its teacher was the held-out fit."""
    if own_dataset and cfg.human.teacher == "all":
        return NOT_HELD_OUT_ALL
    test = images_in_test_fold(cfg, data)
    seen = np.intersect1d(test, np.asarray(trained_rows, dtype=np.int64).ravel())
    if len(seen):
        return (f"not held-out ({len(seen)} of the test fold's {len(test)} images are in the student's training "
                "triplets)")
    if not own_dataset:
        return ("test-fold images in no training triplet (the dataset's teacher is not this run's: whether it saw "
                "them is unknown)")
    return HELD_OUT


def noise_ceiling(probs: np.ndarray | None) -> float | None:
    """The best accuracy any model can reach against responses drawn from `probs` (t, 3) (the proxy's
    generating distributions): the mean over triplets of the most likely choice's probability. For the
    taxonomy proxy, whose flipped responses pick one of the other two pairs, that is 1 − w per triplet
    (w = noise · the level's difficulty, capped at 2/3), so 1 − `human.proxy_noise` on the mix's
    average. None without probabilities."""
    if probs is None or len(probs) == 0:
        return None
    return float(np.asarray(probs, dtype=np.float64).max(axis=1).mean())

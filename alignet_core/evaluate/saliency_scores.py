"""The "where" metric's results: per-model means with 95% intervals and the paired before/after change
(`evaluate.saliency` computes the per-image scores). Records and numpy only: the evaluate stage's output
holds them, and reading a finished stage must not load torch."""

from __future__ import annotations

import numpy as np

from alignet_core.errors import InputError
from alignet_core.runtime.runner import Record
from alignet_core.stats.bootstrap import MeanEstimate, mean_interval


class SaliencyScores(Record):
    """One model's agreement with the maps: means over images with 95% intervals."""

    spearman: MeanEstimate
    iou_top10: MeanEstimate
    dice_top10: MeanEstimate


class SaliencyAlignment(Record):
    """The "where" metric of a model before and after finetuning, on the same images and maps."""

    maps: str  # what the maps are (a proxy is named so)
    label_rule: str  # 'data' or 'top-1 of each model'
    n_images: int
    before: SaliencyScores
    after: SaliencyScores
    spearman_change: MeanEstimate  # mean of per-image (after − before), paired interval
    images: str = ""  # which images, and whether training saw them


def summarize(scores: dict[str, np.ndarray], seed: int) -> SaliencyScores:
    """Means with bootstrap intervals of `per_image_scores`."""
    return SaliencyScores(**{k: mean_interval(v, seed) for k, v in scores.items()})


def saliency_alignment(before: dict[str, np.ndarray], after: dict[str, np.ndarray], maps: str, label_rule: str,
                       seed: int) -> SaliencyAlignment:
    """Compare two models' `per_image_scores` on the same images (paired change of Spearman)."""
    n = len(before["spearman"])
    if len(after["spearman"]) != n:
        raise InputError(f"saliency_alignment: {n} images before and {len(after['spearman'])} after; they must pair up")
    return SaliencyAlignment(maps=maps, label_rule=label_rule, n_images=n, before=summarize(before, seed),
                             after=summarize(after, seed),
                             spearman_change=mean_interval(after["spearman"] - before["spearman"], seed))

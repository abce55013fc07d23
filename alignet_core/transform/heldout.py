"""The held-out figures of a fitted transform, as a reviewer would accept them.

- `heldout_figures`: odd-one-out accuracy on the test fold's triplets, whose three objects were
  all kept out of the fit (and of early stopping and model choice), each with a 95% interval from
  resampling the test objects, and the gain with a paired interval. The zero-shot baseline is the
  reference protocol (gLocal: cosine similarity of the raw object embeddings); the dot products
  of standardized embeddings, where the transform starts from, are reported beside it, named.
  With per-triplet levels (the proxy's), the same figures per abstraction level.
- `triplet_split_figures`: a secondary figure, on held-out *triplets* of the
  training objects (every object was fitted): secondary, labelled as such.
- `uncertainty_figures`: where human choice probabilities exist, how the transformed teacher's
  choice distribution (softmax of its dot products / T, T as fitted) follows them, beside the
  zero-shot baseline's at a temperature fitted on the training triplets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alignet_core.runtime.runner import Record
from alignet_core.stats import bootstrap
from alignet_core.stats.bootstrap import Difference, Estimate
from alignet_core.stats.metrics import odd_one_out_correct, pair_similarities, unit_rows
from alignet_core.stats.uncertainty import (
    UncertaintyAgreement,
    choice_distribution,
    fit_temperature,
    uncertainty_agreement,
)

if TYPE_CHECKING:
    from alignet_core.transform.affine import AffineTransform  # torch: only its type is needed here

ZERO_SHOT = "cosine similarity of the raw embeddings (gLocal's zero-shot protocol)"
ZERO_SHOT_DOT = "dot products of the globally standardized embeddings (where the transform starts)"
TRIPLET_SPLIT = "held-out triplets of the training objects (every object was fitted): not a held-out-object figure"


class LevelFigures(Record):
    zero_shot: Estimate
    transformed: Estimate
    gain: Difference


class HeldOut(Record):
    """Accuracies on the test fold (objects never fitted), with object-bootstrap intervals."""

    n_objects: int
    zero_shot: Estimate
    zero_shot_dot: Estimate
    transformed: Estimate
    gain: Difference  # transformed − zero_shot (reference protocol), paired
    by_level: dict[str, LevelFigures] | None = None
    zero_shot_protocol: str = ZERO_SHOT
    zero_shot_dot_protocol: str = ZERO_SHOT_DOT


class TripletSplitFigures(Record):
    zero_shot: Estimate
    transformed: Estimate
    label: str = TRIPLET_SPLIT


class UncertaintyFigures(Record):
    """Agreement with the human choice distributions on the test fold (see `evaluate.uncertainty`)."""

    transformed: UncertaintyAgreement
    transformed_temperature: float
    zero_shot: UncertaintyAgreement
    zero_shot_temperature: float  # fitted on the training triplets (NLL of the observed choices)


def _outcomes(objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray) -> dict[str, np.ndarray]:
    standardized = (np.asarray(objects, np.float64) - transform.mean) / transform.std
    return {"zero_shot": odd_one_out_correct(objects, triplets, "cosine"),
            "zero_shot_dot": odd_one_out_correct(standardized, triplets, "dot"),
            "transformed": odd_one_out_correct(transform.apply(objects), triplets, "dot")}


def heldout_figures(
    objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray, seed: int, level_of: np.ndarray | None = None
) -> HeldOut:
    """objects: (m, p) object embeddings; triplets: (t, 3) test-fold triplets, odd one in column 2;
    level_of: (t,) level of each triplet, or None."""
    t = np.asarray(triplets, dtype=np.int64)
    out = _outcomes(objects, transform, t)

    def figures(rows: np.ndarray) -> tuple[Estimate, Estimate, Estimate, Difference]:
        sub = t[rows]
        est = {k: bootstrap.accuracy(v[rows], seed, triplets=sub) for k, v in out.items()}
        gain = bootstrap.paired_difference(out["zero_shot"][rows], out["transformed"][rows], seed, triplets=sub)
        return est["zero_shot"], est["zero_shot_dot"], est["transformed"], gain

    z, zd, tr, gain = figures(np.arange(len(t)))
    by_level = None
    if level_of is not None:
        by_level = {}
        for level in sorted(set(np.asarray(level_of).tolist())):
            lz, _, ltr, lgain = figures(np.flatnonzero(np.asarray(level_of) == level))
            by_level[level] = LevelFigures(zero_shot=lz, transformed=ltr, gain=lgain)
    return HeldOut(n_objects=int(len(np.unique(t))), zero_shot=z, zero_shot_dot=zd, transformed=tr, gain=gain,
                   by_level=by_level)


def triplet_split_figures(objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray,
                          seed: int) -> TripletSplitFigures:
    """The secondary figure on held-out triplets of the training objects (triplet bootstrap)."""
    out = _outcomes(objects, transform, np.asarray(triplets, dtype=np.int64))
    return TripletSplitFigures(zero_shot=bootstrap.accuracy(out["zero_shot"], seed),
                               transformed=bootstrap.accuracy(out["transformed"], seed))


def uncertainty_figures(
    objects: np.ndarray,
    transform: AffineTransform,
    test: np.ndarray,
    test_probs: np.ndarray,
    train: np.ndarray,
    temperature: float,
) -> UncertaintyFigures:
    """test, train: (t, 3) triplets (observed odd one last); test_probs: (t, 3) human choice
    probabilities of the test triplets; temperature: the transform's T."""
    raw = unit_rows(objects)
    t_zero = fit_temperature(pair_similarities(raw, train))
    q_zero = choice_distribution(pair_similarities(raw, test), t_zero)
    q_after = choice_distribution(pair_similarities(transform.apply(objects), test), temperature)
    return UncertaintyFigures(transformed=uncertainty_agreement(test_probs, q_after), transformed_temperature=temperature,
                              zero_shot=uncertainty_agreement(test_probs, q_zero), zero_shot_temperature=t_zero)

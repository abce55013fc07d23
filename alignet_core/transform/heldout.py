"""The held-out figures of the k-fold rotation, as a reviewer would accept them.

- `pooled_figures`: odd-one-out accuracy on every fold's test triplets (all three objects in the
  held-out fold, scored by the transform fitted without that fold; early stopping and model choice
  never saw it either), pooled over the k folds so that every object is tested once, each with a
  95% interval from resampling the objects, and the gain with a paired interval. The zero-shot
  baseline is the reference protocol (gLocal: cosine similarity of the raw object embeddings); the
  dot products of standardized embeddings (each fold's own μ, σ), where the transform starts from,
  are reported beside it, named. With per-triplet levels (the proxy's), the same figures per level.
- `FoldFigures`: each fold's own counts and accuracies beside the pooled figure.
- `partial_figures`: secondary, never mixed into the held-out figure: triplets with one or two of
  their objects in a fold, scored by that fold's transform (the others were fitted).
- `triplet_split_figures`: secondary, held-out *triplets* of the training objects (the
  early-stopping rows; every object was fitted), pooled over the folds.
- `uncertainty_figures`: where human choice probabilities exist, how the transformed teacher's
  choice distribution (softmax of its dot products / T, T as fitted) follows them on the pooled
  test triplets, beside the zero-shot baseline's at a temperature fitted on each fold's training
  triplets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alignet_core.runtime.runner import Record
from alignet_core.stats import bootstrap
from alignet_core.stats.bootstrap import Difference, Estimate
from alignet_core.stats.metrics import expected_agreement, odd_one_out_correct, pair_similarities, unit_rows
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
TRIPLET_SPLIT = ("held-out triplets of the training objects (each fold's early-stopping rows; every object was "
                 "fitted): not a held-out-object figure")
PARTIAL = ("secondary: triplets with one or two objects in the held-out fold, scored by that fold's transform (the "
           "other objects were fitted); a triplet spanning several folds is scored once per fold it touches; "
           "intervals resample triplets (they share objects: too narrow); never part of the held-out figure")


DENSE_TEST = ("expected accuracy (the probability that a person picks the odd one the model picks) on triplets drawn "
              "inside each held-out fold, against VICE fitted on every trial (a model of the people, not a fit of "
              "the model scored); ceiling: the mean over triplets of VICE's largest choice probability")
REAL_TEST = ("accuracy on the real trials whose three objects are in the held-out fold (each person's own choice), "
             "scored by that fold's transform")


class LevelFigures(Record):
    zero_shot: Estimate
    transformed: Estimate
    gain: Difference


class HeldOut(Record):
    """Accuracies on the test triplets of every fold (objects never fitted by the transform that
    scored them), pooled over the folds, with object-resampling intervals."""

    n_objects: int  # distinct objects in the pooled test triplets
    n_folds: int = 1  # folds pooled
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


class FoldFigures(Record):
    """One fold of the rotation: its counts, its fit, and its test triplets' accuracies (no interval:
    the pooled figure has them)."""

    fold: int
    held_out_objects: int  # objects in the fold
    train_objects: int
    fit_triplets: int  # rows the fit trained on (no object in the fold, less the early-stopping rows)
    stop_triplets: int  # early-stopping rows (a random triplet split of the training rows)
    test_triplets: int  # all three objects in the fold
    partial_triplets: int  # one or two objects in the fold (secondary)
    zero_shot: float
    transformed: float
    best_epoch: int
    epochs_run: int
    knn_overlap: float
    vice_acc: float | None = None  # VICE on the early-stopping rows, when it made the soft targets


class PartialFigures(Record):
    """Secondary: test-adjacent triplets, by how many of their objects the scoring fold held out."""

    one_object: LevelFigures
    two_objects: LevelFigures
    label: str = PARTIAL


class UncertaintyFigures(Record):
    """Agreement with the human choice distributions on the pooled test triplets (see `evaluate.uncertainty`)."""

    transformed: UncertaintyAgreement
    transformed_temperature: float
    zero_shot: UncertaintyAgreement
    zero_shot_temperature: float  # fitted on each fold's training triplets (NLL of the observed choices); the mean


class ExpectedFigures(Record):
    """Expected accuracy against a model of the people's choice probabilities (`human.densify`), pooled
    over the folds' test triplets, with object-clustered intervals, and that model's own ceiling."""

    n_objects: int
    zero_shot: Estimate
    transformed: Estimate
    gain: Difference
    ceiling: float
    label: str = DENSE_TEST


class RealFigures(Record):
    """Accuracy on the real trials inside each held-out fold (few: a THINGS file's trials rarely name three
    objects with images), pooled over the folds."""

    n_objects: int
    zero_shot: Estimate
    transformed: Estimate
    gain: Difference
    label: str = REAL_TEST


def expected_outcomes(objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray, probs: np.ndarray
                      ) -> dict[str, np.ndarray]:
    """Per-triplet probability (t,) that a person picks the zero-shot protocol's / the transform's odd one."""
    t = np.asarray(triplets, dtype=np.int64)
    return {"zero_shot": expected_agreement(pair_similarities(unit_rows(objects), t), probs),
            "transformed": expected_agreement(pair_similarities(transform.apply(objects), t), probs)}


def expected_figures(out: dict[str, np.ndarray], triplets: np.ndarray, probs: np.ndarray, seed: int) -> ExpectedFigures:
    """`ExpectedFigures` of `expected_outcomes` concatenated over the folds (triplets (t, 3), probs (t, 3))."""
    t = np.asarray(triplets, dtype=np.int64)
    overlap = bootstrap.ObjectOverlap(t)
    return ExpectedFigures(
        n_objects=len(np.unique(t)), zero_shot=bootstrap.expected_accuracy(out["zero_shot"], seed, overlap),
        transformed=bootstrap.expected_accuracy(out["transformed"], seed, overlap),
        gain=bootstrap.expected_change(out["zero_shot"], out["transformed"], seed, overlap),
        ceiling=float(np.asarray(probs).max(1).mean()))


def real_figures(out: dict[str, np.ndarray], triplets: np.ndarray, seed: int) -> RealFigures:
    """`RealFigures` of `outcomes` on the real test-fold trials, concatenated over the folds."""
    t = np.asarray(triplets, dtype=np.int64)
    c = bootstrap.compare(out["zero_shot"], out["transformed"], seed, t if len(t) else None)
    return RealFigures(n_objects=len(np.unique(t)), zero_shot=c.before, transformed=c.after, gain=c.change)


def outcomes(objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-triplet outcomes (t,) bool of the zero-shot protocols and the transform on `triplets` (t, 3),
    in chunks of rows (a fold's partial triplets run to millions)."""
    t = np.asarray(triplets, dtype=np.int64)
    standardized = ((np.asarray(objects, np.float64) - transform.mean) / transform.std).astype(np.float32)
    after = transform.apply(objects)
    step = max(1024, 2**24 // max(1, np.asarray(objects).shape[1]))
    parts: dict[str, list[np.ndarray]] = {"zero_shot": [], "zero_shot_dot": [], "transformed": []}
    for start in range(0, len(t), step):
        c = t[start:start + step]
        parts["zero_shot"].append(odd_one_out_correct(objects, c, "cosine"))
        parts["zero_shot_dot"].append(odd_one_out_correct(standardized, c, "dot"))
        parts["transformed"].append(odd_one_out_correct(after, c, "dot"))
    return {k: np.concatenate(v) if v else np.zeros(0, dtype=bool) for k, v in parts.items()}


def heldout_figures(
    objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray, seed: int, level_of: np.ndarray | None = None
) -> HeldOut:
    """One transform's held-out figures: objects: (m, p) object embeddings; triplets: (t, 3) triplets of
    objects it never fitted, odd one in column 2; level_of: (t,) level of each triplet, or None."""
    t = np.asarray(triplets, dtype=np.int64)
    return pooled_figures(outcomes(objects, transform, t), t, seed, level_of)


def pooled_figures(
    out: dict[str, np.ndarray], triplets: np.ndarray, seed: int, level_of: np.ndarray | None = None, n_folds: int = 1
) -> HeldOut:
    """The held-out figures of per-triplet outcomes (`outcomes` of each fold's transform on its own
    test triplets, concatenated over the folds): out: {zero_shot, zero_shot_dot, transformed} each (t,)
    bool; triplets: (t, 3) object ids (objects are resampled); level_of: (t,) or None."""
    t = np.asarray(triplets, dtype=np.int64)

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
    return HeldOut(n_objects=len(np.unique(t)), n_folds=n_folds, zero_shot=z, zero_shot_dot=zd, transformed=tr,
                   gain=gain, by_level=by_level)


def partial_figures(out: dict[str, np.ndarray], n_held: np.ndarray, seed: int) -> PartialFigures:
    """out: {zero_shot, transformed} (t,) bool outcomes of partial triplets, each scored by the fold it
    touches; n_held: (t,) how many of the triplet's objects that fold held out (1 or 2)."""
    def part(rows: np.ndarray) -> LevelFigures:
        z, a = out["zero_shot"][rows], out["transformed"][rows]
        return LevelFigures(zero_shot=bootstrap.accuracy(z, seed), transformed=bootstrap.accuracy(a, seed),
                            gain=bootstrap.paired_difference(z, a, seed))
    return PartialFigures(one_object=part(np.flatnonzero(n_held == 1)), two_objects=part(np.flatnonzero(n_held == 2)))


def triplet_split_figures(objects: np.ndarray, transform: AffineTransform, triplets: np.ndarray,
                          seed: int) -> TripletSplitFigures:
    """The secondary figure on held-out triplets of the training objects (triplet bootstrap)."""
    out = outcomes(objects, transform, np.asarray(triplets, dtype=np.int64))
    return triplet_split_from(out, seed)


def triplet_split_from(out: dict[str, np.ndarray], seed: int) -> TripletSplitFigures:
    """`triplet_split_figures` of outcomes pooled over the folds' early-stopping rows."""
    return TripletSplitFigures(zero_shot=bootstrap.accuracy(out["zero_shot"], seed),
                               transformed=bootstrap.accuracy(out["transformed"], seed))


def choice_distributions(
    objects: np.ndarray, transform: AffineTransform, test: np.ndarray, train: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One fold's model choice distributions over its test triplets: (q_transformed (t, 3), q_zero_shot
    (t, 3), the zero-shot temperature fitted on its training triplets `train`)."""
    raw = unit_rows(objects)
    t_zero = fit_temperature(pair_similarities(raw, train))
    q_zero = choice_distribution(pair_similarities(raw, test), t_zero)
    q_after = choice_distribution(pair_similarities(transform.apply(objects), test), temperature)
    return q_after, q_zero, t_zero


def uncertainty_pooled(test_probs: np.ndarray, q_after: np.ndarray, q_zero: np.ndarray, temperature: float,
                       zero_shot_temperature: float) -> UncertaintyFigures:
    """`UncertaintyFigures` of choice distributions concatenated over the folds."""
    return UncertaintyFigures(transformed=uncertainty_agreement(test_probs, q_after), transformed_temperature=temperature,
                              zero_shot=uncertainty_agreement(test_probs, q_zero),
                              zero_shot_temperature=zero_shot_temperature)


def uncertainty_figures(
    objects: np.ndarray,
    transform: AffineTransform,
    test: np.ndarray,
    test_probs: np.ndarray,
    train: np.ndarray,
    temperature: float,
) -> UncertaintyFigures:
    """One transform's: test, train: (t, 3) triplets (observed odd one last); test_probs: (t, 3) human
    choice probabilities of the test triplets; temperature: the transform's T."""
    q_after, q_zero, t_zero = choice_distributions(objects, transform, test, train, temperature)
    return uncertainty_pooled(test_probs, q_after, q_zero, temperature, t_zero)

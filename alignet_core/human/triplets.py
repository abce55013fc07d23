"""Human odd-one-out data for stage 1: the taxonomy *proxy* triplets, object-disjoint splits and
object embeddings.

Real THINGS triplets cannot ship with the package, so the demo builds triplets that stand in for
human odd-one-out judgments from a taxonomy of the images (emoji category → subcategory). They
are a **proxy**, not human data: everything they produce must be named as such.

The proxy is a stated mix of taxonomy levels (`human.levels`: category_boundary, sibling_boundary,
class_boundary; taxonomy answer, ceiling 100%), because human choices across diverse objects follow coarse categories first and
finer distinctions within them; a proxy drawn at one level teaches only that level. It models a
noisy human: the response distribution over the pairs [(i, j), (i, k), (j, k)] (the convention of
`alignet_core.io.formats`) of a triplet whose taxonomic pair is (i, j) puts 1 − w on (i, j) and
w / 2 on each other pair, where the error mass w = noise · d grows with the level's difficulty d
(`LEVEL_DIFFICULTY`, rescaled so that the mean over the drawn triplets is 1, then capped at the
chance mass 2/3). An observed response is sampled from that distribution, so about a `noise`
fraction of the rows disagree with the taxonomy, and each row is reordered so the *chosen* odd one
is in column 2, with its probability row permuted to match.

Held-out figures must never involve objects a fit has seen: `object_folds` deals the objects into
k folds and, for each held-out fold in turn (`fold_splits`, the k-fold rotation), `split_by_objects`
gives the rows a fit may train on (no object in the fold), the rows it is scored on (all three
objects in it) and the rows that serve neither (one or two objects in it: a secondary figure only).
With a fixed triplet file about ((k−1)/k)³ of the rows train each rotation and (1/k)² are held-out
test rows over the k rotations together; proxy triplets are drawn inside each fold instead, so every
proxy triplet is a test row of one rotation and a training row of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from alignet_core.errors import InputError
from alignet_core.human.levels import LEVELS, admits, level_triplets

log = logging.getLogger(__name__)

#: relative difficulty of each level for the noisy-human response model (error mass ∝ difficulty)
LEVEL_DIFFICULTY = {"category_boundary": 1.0, "sibling_boundary": 1.5, "class_boundary": 0.5}
CHANCE_ERROR_MASS = 2.0 / 3.0

# For an observed choice c of the most similar pair among [(i,j), (i,k), (j,k)] of (i, j, k):
# the new order of the three objects (chosen pair first, odd one last) ...
_IMAGE_PERM = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])
# ... and where each new pair's probability sits among the old [p_ij, p_ik, p_jk]
# (the same tables as `formats.order_by_similarity`).
_PAIR_PERM = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])


def apportion(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """`total` split over the keys of `weights` in proportion to them (largest remainders; the
    counts sum to `total`). Weights must be non-negative with a positive sum."""
    w = {k: float(v) for k, v in weights.items()}
    if any(v < 0 for v in w.values()) or not sum(w.values()) > 0:
        raise InputError(f"weights must be non-negative with a positive sum, got {dict(weights)}")
    exact = {k: total * v / sum(w.values()) for k, v in w.items()}
    counts = {k: int(np.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def level_counts(mix: Mapping[str, float], n_triplets: int) -> dict[str, int]:
    """Split `n_triplets` over the levels of `mix` in proportion to its weights."""
    unknown = sorted(set(mix) - set(LEVELS))
    if unknown:
        raise InputError(f"proxy mix: unknown levels {unknown}; expected some of {list(LEVELS)}")
    return apportion(mix, n_triplets)


def make_proxy_triplets(
    coarse: np.ndarray,
    fine: np.ndarray,
    mix: Mapping[str, float],
    n_triplets: int,
    noise: float,
    seed: int,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taxonomy proxy triplets at a mix of levels, answered by a noisy-human response model.

    coarse, fine: (n,) labels of every object (fine classes nest in coarse categories); mix:
    level → weight (e.g. {'category_boundary': 0.5, 'sibling_boundary': 0.5}); pool: the objects to draw from (default
    all); `noise` in [0, 1): the mean error mass of the response model.

    Returns (triplets, probs, level_of): triplets (n_triplets, 3) int64 with the *observed*
    (sampled) odd one in column 2; probs (n_triplets, 3) float32, rows summing to 1, the
    probabilities of the pairs [(t0, t1), (t0, t2), (t1, t2)] of the returned row; level_of
    (n_triplets,) str, each row's level. Deterministic for a seed.
    """
    if n_triplets < 0:
        raise InputError(f"n_triplets: expected a non-negative count, got {n_triplets}")
    if not 0.0 <= noise < 1.0:
        raise InputError(f"noise: expected a value in [0, 1), got {noise}")
    level_counts(mix, n_triplets)  # checks the mix: known levels, non-negative weights with a positive sum
    rng = np.random.default_rng(seed)
    drawable = {lv: w for lv, w in mix.items() if w and admits(coarse, fine, lv, pool)}  # type: ignore[arg-type]
    if not drawable and n_triplets:
        raise InputError(f"proxy mix: none of the levels {sorted(mix)} can be drawn from these objects (their "
                         "categories and classes do not admit one)")
    if set(drawable) != {lv for lv, w in mix.items() if w}:
        log.warning("proxy: levels %s have no triplet among these %s objects; their share goes to %s",
                    sorted(set(mix) - set(drawable)), "all" if pool is None else len(pool), sorted(drawable))
    parts, levels = [], []
    for level, count in (level_counts(drawable, n_triplets) if drawable else {}).items():
        if count:
            parts.append(level_triplets(coarse, fine, level, count, rng, pool))  # type: ignore[arg-type]
            levels += [level] * count
    if not parts:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32), np.zeros(0, dtype=str)
    order = rng.permutation(n_triplets)  # levels interleaved
    triplets = np.concatenate(parts)[order]
    level_of = np.asarray(levels, dtype=str)[order]
    difficulty = np.array([LEVEL_DIFFICULTY[lv] for lv in level_of])
    difficulty = difficulty / difficulty.mean()
    wrong = np.minimum(noise * difficulty, CHANCE_ERROR_MASS)
    probs = np.stack([1.0 - wrong, wrong / 2.0, wrong / 2.0], axis=1)  # over [(i,j), (i,k), (j,k)]
    triplets, probs, choice = observe(triplets, probs, rng)
    log.debug("proxy triplets: %d rows, %.3f disagree with the taxonomy (noise %.3f)",
              n_triplets, float(np.mean(choice != 0)), noise)
    return triplets, probs, level_of


def observe(triplets: np.ndarray, probs: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample each row's most similar pair from `probs` (over [(i,j), (i,k), (j,k)]) and reorder the row so
    the sampled odd one is in column 2, its probability row permuted to match. Returns (triplets int64,
    probs float32, the sampled pair index per row)."""
    u = rng.random(len(triplets))
    choice = (u >= probs[:, 0]).astype(np.int64) + (u >= probs[:, 0] + probs[:, 1]).astype(np.int64)
    return (np.take_along_axis(triplets, _IMAGE_PERM[choice], axis=1).astype(np.int64),
            np.take_along_axis(probs, _PAIR_PERM[choice], axis=1).astype(np.float32), choice)


def object_folds(n_objects: int, folds: int, seed: int) -> np.ndarray:
    """(n_objects,) int64 fold of each object: a seeded permutation dealt round-robin into `folds`
    folds of near-equal size."""
    if folds < 2:
        raise InputError(f"folds: expected at least 2, got {folds}")
    fold_of = np.empty(n_objects, dtype=np.int64)
    fold_of[np.random.default_rng([seed, 17]).permutation(n_objects)] = np.arange(n_objects) % folds
    return fold_of


@dataclass(frozen=True)
class TripletSplit:
    """Rows of a triplet array by their objects' relation to one held-out fold.

    train: rows with no object in the fold (what a fit that holds the fold out may use); test: rows
    with all three objects in it (the object-disjoint held-out figure); partial: rows with one or two
    objects in it (scored only as a secondary figure, never mixed into the held-out one); n_mixed =
    len(partial). All (.,) int64 sorted row indices; together they are every row once."""

    train: np.ndarray
    test: np.ndarray
    partial: np.ndarray

    @property
    def n_mixed(self) -> int:
        return len(self.partial)


def split_by_objects(triplets: np.ndarray, fold_of: np.ndarray, test_fold: int) -> TripletSplit:
    """The rows of `triplets` (t, 3) by how many of their objects lie in `test_fold`
    (`fold_of`: (n_objects,) fold of each object): none → train, three → test, one or two → partial."""
    inside = (np.asarray(fold_of)[np.asarray(triplets, dtype=np.int64)] == test_fold).sum(1)  # (t,)
    return TripletSplit(train=np.flatnonzero(inside == 0), test=np.flatnonzero(inside == 3),
                        partial=np.flatnonzero((inside == 1) | (inside == 2)))


def fold_splits(triplets: np.ndarray, fold_of: np.ndarray, folds: int) -> list[TripletSplit]:
    """`split_by_objects` for every fold 0..folds-1 (the k-fold rotation): each object is held out
    in exactly one fold, so the folds' test rows are disjoint and every row whose three objects share
    a fold is a test row of exactly one rotation."""
    return [split_by_objects(triplets, fold_of, f) for f in range(folds)]


def split_triplets(n: int, val_fraction: float, seed: int, max_val: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split n triplet rows at random into train and held-out rows (by triplet, as for THINGS).

    Returns (train, val): sorted int64 row indices, disjoint, together 0..n-1; val has
    round(n · val_fraction) rows (at most `max_val`), at least 1 and at most n − 1 when n ≥ 2.
    Deterministic for a seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    if n < 2:
        raise InputError(f"split_triplets: need at least 2 triplets to hold some out, got {n}")
    n_val = int(round(n * val_fraction)) if max_val is None else min(int(round(n * val_fraction)), max_val)
    n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def object_embeddings(embeddings: np.ndarray, object_of_image: np.ndarray, n_objects: int) -> np.ndarray:
    """Mean embedding of each object's images (THINGS: object embedding = mean over its images).

    embeddings: (n, p) float, one row per image; object_of_image: (n,) int object id per image,
    a negative id marks an image tied to no object (e.g. one that failed to decode) and is
    skipped. Returns (n_objects, p) float32 (mean accumulated in float64). An object with no image
    is an `InputError` naming it.
    """
    e = np.asarray(embeddings)
    obj = np.asarray(object_of_image)
    if e.ndim != 2:
        raise InputError(f"embeddings: expected shape (n, p), got {e.shape}")
    if obj.shape != (len(e),):
        raise InputError(f"object_of_image: expected shape ({len(e)},) to match the embeddings, got {obj.shape}")
    if obj.size and not np.issubdtype(obj.dtype, np.integer):
        raise InputError(f"object_of_image: object ids must be integers, got {obj.dtype}")
    if n_objects <= 0:
        raise InputError(f"n_objects: expected a positive count, got {n_objects}")
    obj = obj.astype(np.int64)
    if (obj >= n_objects).any():
        row = int(np.flatnonzero(obj >= n_objects)[0])
        raise InputError(f"object_of_image: image {row} has object id {int(obj[row])}, outside [0, {n_objects})")
    keep = np.flatnonzero(obj >= 0)
    counts = np.bincount(obj[keep], minlength=n_objects)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise InputError(
            f"object_of_image: {len(missing)} object(s) have no image, e.g. object {int(missing[0])}; "
            "every object needs at least one valid image"
        )
    by_obj = keep[np.argsort(obj[keep], kind="stable")]
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sums = np.add.reduceat(e[by_obj].astype(np.float64), starts, axis=0)
    return (sums / counts[:, None]).astype(np.float32)

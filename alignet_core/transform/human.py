"""Human odd-one-out data for stage 1: the demo's taxonomy-derived *proxy* triplets, train/val
splits and object embeddings.

Real THINGS triplets cannot ship with the package, so the demo builds triplets that stand in for
human odd-one-out judgments from a taxonomy of the images (e.g. emoji subcategory within
category). They are a **proxy**, not human data: everything they produce must be named as such.

The proxy models a noisy human. Each triplet takes two objects i, j from one fine group and an
odd one k from another group. With a coarse level given, half of the odd ones are *hard* (another
fine group of the same coarse group) and half *easy* (another coarse group). The "human"
response distribution over the pairs [(i, j), (i, k), (j, k)] (the convention of
`alignet_core.io.formats`) puts 1 − w on the taxonomic pair (i, j) and w / 2 on each other pair,
where the error mass w = noise · d grows with difficulty d (hard 1.5, easy 0.5, no coarse level
1.0, rescaled so the mean of d over the drawn triplets is 1, then capped at the chance mass 2/3).
An observed response is then sampled from that distribution, so about a `noise` fraction of the
returned rows disagree with the taxonomy, and the row is reordered so the *chosen* odd one is in
column 2, with its probability row permuted to match.
"""

from __future__ import annotations

import logging

import numpy as np

from alignet_core.errors import InputError

log = logging.getLogger(__name__)

HARD_DIFFICULTY = 1.5
EASY_DIFFICULTY = 0.5
CHANCE_ERROR_MASS = 2.0 / 3.0

# For an observed choice c of the most similar pair among [(i,j), (i,k), (j,k)] of (i, j, k):
# the new order of the three objects (chosen pair first, odd one last) ...
_IMAGE_PERM = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])
# ... and where each new pair's probability sits among the old [p_ij, p_ik, p_jk]
# (the same tables as `formats.order_by_similarity`).
_PAIR_PERM = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])


def _as_labels(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise InputError(f"{what}: expected a 1-d array of group ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{what}: group ids must be integers, got {a.dtype}")
    return a.astype(np.int64)


def _draw_outside(
    rng: np.random.Generator, order: np.ndarray, lo: np.ndarray, hi: np.ndarray, start: np.ndarray, stop: np.ndarray
) -> np.ndarray:
    """Uniform draw from `order[lo:hi]` minus the sub-range `order[start:stop]` (row-wise, vectorized)."""
    width = (hi - lo) - (stop - start)
    r = lo + np.floor(rng.random(len(lo)) * width).astype(np.int64)
    r = np.where(r >= start, r + (stop - start), r)
    return order[np.minimum(r, len(order) - 1)]  # rows with an empty range are discarded by the caller


def make_proxy_triplets(
    fine: np.ndarray, coarse: np.ndarray | None, n_triplets: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample taxonomy-derived proxy triplets with a noisy-human response model.

    fine: (n,) int fine group id per object (object i = image i in the demo); coarse: (n,) int
    coarse group id or None. Fine groups must nest in coarse groups (one coarse id per fine
    group). The pair (i, j) is drawn by a uniform anchor i among objects whose fine group has at
    least 2 members and a uniform partner j from that group; the odd one k is hard or easy (see
    the module docstring), falling back to the other kind when an anchor has no candidate of the
    drawn kind. `noise` in [0, 1) is the mean error mass of the response model.

    Returns (triplets, probs): triplets (n_triplets, 3) int64 with the *observed* (sampled) odd one
    in column 2; probs (n_triplets, 3) float32, rows summing to 1, the probabilities of the pairs
    [(t0, t1), (t0, t2), (t1, t2)] of the returned row. Deterministic for a seed.
    """
    fine = _as_labels(fine, "fine")
    n = len(fine)
    if coarse is not None:
        coarse = _as_labels(coarse, "coarse")
        if len(coarse) != n:
            raise InputError(f"coarse: {len(coarse)} ids for {n} objects in fine")
    if n_triplets < 0:
        raise InputError(f"n_triplets: expected a non-negative count, got {n_triplets}")
    if not 0.0 <= noise < 1.0:
        raise InputError(f"noise: expected a value in [0, 1), got {noise}")
    rng = np.random.default_rng(seed)

    # Sort objects by (coarse, fine): every coarse group and, inside it, every fine group is a
    # contiguous range of `order`, so "outside my group" draws are index arithmetic.
    c = coarse if coarse is not None else np.zeros(n, dtype=np.int64)
    if coarse is not None and n:
        pairs = np.unique(np.stack([fine, c], 1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            bad = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
            raise InputError(f"fine group {int(bad)} spans several coarse groups; fine groups must nest in coarse ones")
    order = np.lexsort((fine, c))
    f_sorted, c_sorted = fine[order], c[order]
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    # range [f_start, f_stop) of each object's fine group and [c_start, c_stop) of its coarse group
    f_key = np.r_[True, (f_sorted[1:] != f_sorted[:-1]) | (c_sorted[1:] != c_sorted[:-1])] if n else np.zeros(0, bool)
    c_key = np.r_[True, c_sorted[1:] != c_sorted[:-1]] if n else np.zeros(0, bool)
    f_starts, c_starts = np.flatnonzero(f_key), np.flatnonzero(c_key)
    f_id, c_id = np.cumsum(f_key) - 1, np.cumsum(c_key) - 1
    f_bounds, c_bounds = np.r_[f_starts, n], np.r_[c_starts, n]
    f_start, f_stop = f_bounds[f_id], f_bounds[f_id + 1]  # indexed by sorted position
    c_start, c_stop = c_bounds[c_id], c_bounds[c_id + 1]

    anchors = np.flatnonzero(f_stop - f_start >= 2)  # sorted positions that can give a pair
    if len(anchors) == 0:
        raise InputError("fine: no group has 2 or more objects, so no same-group pair can be drawn")
    if len(f_starts) < 2:
        raise InputError("fine: only one group, so no odd one from another group can be drawn")
    if n_triplets == 0:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32)

    a = anchors[rng.integers(0, len(anchors), n_triplets)]
    fs, fe, cs, ce = f_start[a], f_stop[a], c_start[a], c_stop[a]
    size = fe - fs
    b = fs + (a - fs + 1 + np.floor(rng.random(n_triplets) * (size - 1)).astype(np.int64)) % size

    if coarse is None:
        k = _draw_outside(rng, order, np.zeros_like(fs), np.full_like(fs, n), fs, fe)
        difficulty = np.ones(n_triplets)
    else:
        has_hard = (ce - cs) - size > 0
        has_easy = n - (ce - cs) > 0
        want_hard = rng.random(n_triplets) < 0.5
        hard = (want_hard & has_hard) | ~has_easy
        k_hard = _draw_outside(rng, order, cs, ce, fs, fe)  # same coarse group, other fine group
        k_easy = _draw_outside(rng, order, np.zeros_like(cs), np.full_like(cs, n), cs, ce)  # other coarse group
        k = np.where(hard, k_hard, k_easy)
        difficulty = np.where(hard, HARD_DIFFICULTY, EASY_DIFFICULTY)
        difficulty = difficulty / difficulty.mean()
    i, j = order[a], order[b]

    wrong = np.minimum(noise * difficulty, CHANCE_ERROR_MASS)
    probs = np.stack([1.0 - wrong, wrong / 2.0, wrong / 2.0], axis=1)  # over [(i,j), (i,k), (j,k)]
    u = rng.random(n_triplets)
    choice = (u >= probs[:, 0]).astype(np.int64) + (u >= probs[:, 0] + probs[:, 1]).astype(np.int64)
    triplets = np.stack([i, j, k], axis=1)
    triplets = np.take_along_axis(triplets, _IMAGE_PERM[choice], axis=1).astype(np.int64)
    probs = np.take_along_axis(probs, _PAIR_PERM[choice], axis=1).astype(np.float32)
    log.debug(
        "proxy triplets: %d rows, %.3f disagree with the taxonomy (noise %.3f)",
        n_triplets, float(np.mean(choice != 0)), noise,
    )
    return triplets, probs


def split_triplets(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split n triplet rows at random into train and held-out rows (by triplet, as for THINGS).

    Returns (train, val): sorted int64 row indices, disjoint, together 0..n-1; val has
    round(n · val_fraction) rows, at least 1 and at most n − 1 when n ≥ 2. Deterministic for a seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    if n < 2:
        raise InputError(f"split_triplets: need at least 2 triplets to hold some out, got {n}")
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
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

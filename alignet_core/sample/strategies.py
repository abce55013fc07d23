"""Triplet sampling strategies (stage 3): one pure, vectorized function per shard.

The AligNet paper builds its dataset from image triplets whose odd one out is chosen later by
the human-aligned teacher. How the three images are drawn decides which level of abstraction
the triplets probe; the official release names five samplings, all implemented here over a
`groups` array (one group id per image of the pool: the image's class for the `*_class`
strategies, its k-means cluster for the `cluster*` ones; -1 marks an image that must never be
drawn, e.g. an undecodable one):

- ``between_class`` and ``cluster``: three images from three *different* groups. These are the
  coarse, "global" triplets: the teacher has to decide which of three unrelated concepts is the
  odd one out (the official ``cluster_500`` files use this with k = 500 clusters).
- ``within_class``: all three images from *one* group: fine-grained triplets inside a class.
- ``class_border`` and ``cluster_border``: two images from one group and one from another. These
  are the "boundary" triplets of the paper (the default sampling, ``cluster_border_500``). Which
  image is the odd one out is *not* fixed here: the teacher decides from its similarities, so a
  border triplet may well end up with one of the two same-group images as the odd one.

Probabilities, following "uniform over images as far as the strategy allows": a group is chosen
with probability proportional to its size (among the groups large enough for its role), and
images are uniform inside it, so that each eligible image is equally likely to be the anchor of a
triplet. Concretely, with S the number of eligible images:

- within: group g ∝ n_g among groups with n_g ≥ 3; three distinct images of g uniformly.
  Every image of those groups then appears with the same frequency.
- border: the pair's group A ∝ n_A among groups with n_A ≥ 2; two distinct images of A
  uniformly; the third image uniform over all eligible images outside A.
- between: the first image uniform over all S eligible images, the second uniform over the
  images outside its group, the third uniform over the images outside both groups (i.e. groups
  drawn in turn ∝ size, without replacement).

Finally the three positions of every row are shuffled, so that no position carries a hint of the
group structure (the "other group" image is not always last). No image ever occurs twice in a
triplet. Groups too small for a strategy are skipped; a request the groups cannot satisfy at all
(fewer than three groups for between, no group of three for within, no group of two or only one
group for border) is a `ConfigError`.

Determinism: the generator is ``np.random.default_rng([seed, shard_index, strategy code])``, so a
shard's triplets depend only on (strategy, seed, shard index, groups), never on how many workers
run or in which order the shards are made. Everything is vectorized numpy (no per-triplet Python
loop); a shard of a million triplets takes well under a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from alignet_core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

STRATEGIES = ("between_class", "within_class", "class_border", "cluster", "cluster_border")

# which rule each strategy follows; the group ids (classes or clusters) come from the caller
_RULE = {
    "between_class": "between",
    "cluster": "between",
    "within_class": "within",
    "class_border": "border",
    "cluster_border": "border",
}

# the six orderings of three positions
_PERMS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], dtype=np.int64)


def strategy_code(strategy: str) -> int:
    """The strategy's fixed integer code (its position in `STRATEGIES`), used in shard seeds."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"sample.strategies: unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    return STRATEGIES.index(strategy)


@dataclass(frozen=True)
class _Pool:
    """Eligible images sorted by group: group j owns positions [start[j], start[j] + size[j])."""

    members: np.ndarray  # (S,) int64 pool rows, sorted by group (stable, so by row inside a group)
    start: np.ndarray  # (k,) int64 first position of each group in `members`
    size: np.ndarray  # (k,) int64 images per group
    group_of: np.ndarray  # (S,) int64 group index (0..k-1) of each position


def _pool(groups: np.ndarray) -> _Pool:
    g = np.asarray(groups)
    if g.ndim != 1:
        raise InputError(f"groups: expected a 1-d array of group ids, got shape {g.shape}")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise InputError(f"groups: expected integer group ids (-1 = not eligible), got {g.dtype}")
    g = g.astype(np.int64, copy=False)
    rows = np.flatnonzero(g >= 0)
    gv = g[rows]
    order = np.argsort(gv, kind="stable")
    members = rows[order]
    sorted_g = gv[order]
    if len(sorted_g):
        starts_mask = np.empty(len(sorted_g), dtype=bool)
        starts_mask[0] = True
        starts_mask[1:] = sorted_g[1:] != sorted_g[:-1]
        start = np.flatnonzero(starts_mask).astype(np.int64)
    else:
        start = np.zeros(0, dtype=np.int64)
    size = np.diff(np.append(start, len(members))).astype(np.int64)
    group_of = np.repeat(np.arange(len(start), dtype=np.int64), size)
    return _Pool(members, start, size, group_of)


def _uniform_in(rng: np.random.Generator, start: np.ndarray, size: np.ndarray, k: int) -> np.ndarray:
    """k distinct positions per row, uniform inside [start, start + size): (m, k) int64 (k ≤ 3).

    Sampling without replacement by the shift trick: draw x_j in [0, size - j) and step it over
    the positions already taken, which is exactly uniform over ordered distinct tuples.
    """
    a = rng.integers(0, size)
    if k == 1:
        return (start + a)[:, None]
    b = rng.integers(0, size - 1)
    b = b + (b >= a)
    if k == 2:
        return np.stack([start + a, start + b], axis=1)
    c = rng.integers(0, size - 2)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    c = c + (c >= lo)
    c = c + (c >= hi)
    return np.stack([start + a, start + b, start + c], axis=1)


def _outside(rng: np.random.Generator, pool: _Pool, excluded: list[np.ndarray]) -> np.ndarray:
    """One position per row, uniform over every eligible image outside the excluded groups.

    excluded: one or two (m,) arrays of distinct group indices per row. Draws x in
    [0, S - Σ excluded sizes) and steps it over the excluded groups' position ranges in
    increasing order, so every allowed position has the same probability.
    """
    total = len(pool.members)
    if len(excluded) == 1:
        (e,) = excluded
        x = rng.integers(0, total - pool.size[e])
        return x + pool.size[e] * (x >= pool.start[e])
    e1, e2 = excluded
    lo = np.where(pool.start[e1] < pool.start[e2], e1, e2)
    hi = np.where(pool.start[e1] < pool.start[e2], e2, e1)
    x = rng.integers(0, total - pool.size[e1] - pool.size[e2])
    x = x + pool.size[lo] * (x >= pool.start[lo])
    x = x + pool.size[hi] * (x >= pool.start[hi])
    return x


def _choose_groups(rng: np.random.Generator, pool: _Pool, min_size: int, m: int) -> np.ndarray:
    """m group indices ∝ size among the groups with at least `min_size` images."""
    ok = np.flatnonzero(pool.size >= min_size)
    w = pool.size[ok].astype(np.float64)
    cum = np.cumsum(w)
    u = rng.random(m) * cum[-1]
    pick = np.searchsorted(cum, u, side="right")
    return ok[np.minimum(pick, len(ok) - 1)]


def sample_shard(strategy: str, groups: np.ndarray, n_triplets: int, seed: int, shard_index: int) -> np.ndarray:
    """Sample one shard of triplets for a strategy (see the module docstring for the semantics).

    groups: (n,) int group id per pool row (class label or cluster id), -1 = never sampled.
    Returns (n_triplets, 3) int64 rows into the pool, three distinct rows per triplet, positions
    shuffled. Depends only on (strategy, seed, shard_index, groups).
    """
    code = strategy_code(strategy)
    if n_triplets < 0:
        raise ConfigError(f"n_triplets: expected a non-negative number of triplets, got {n_triplets}")
    if seed < 0 or shard_index < 0:
        raise ConfigError(f"seed and shard_index must be non-negative, got seed={seed}, shard_index={shard_index}")
    pool = _pool(groups)
    rule = _RULE[strategy]
    k = len(pool.size)
    if rule == "between" and k < 3:
        raise ConfigError(f"strategy {strategy!r} needs images in at least 3 groups; the eligible pool has {k}")
    if rule == "within" and not (pool.size >= 3).any():
        raise ConfigError(f"strategy {strategy!r} needs a group with at least 3 images; the largest has {pool.size.max(initial=0)}")
    if rule == "border" and (k < 2 or not (pool.size >= 2).any()):
        raise ConfigError(
            f"strategy {strategy!r} needs a group with at least 2 images and at least 2 groups; "
            f"the eligible pool has {k} group(s), the largest with {pool.size.max(initial=0)} images"
        )
    m = int(n_triplets)
    if m == 0:
        return np.zeros((0, 3), dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(shard_index), code])

    if rule == "within":
        g = _choose_groups(rng, pool, 3, m)
        pos = _uniform_in(rng, pool.start[g], pool.size[g], 3)
    elif rule == "border":
        g = _choose_groups(rng, pool, 2, m)
        pair = _uniform_in(rng, pool.start[g], pool.size[g], 2)
        odd = _outside(rng, pool, [g])
        pos = np.concatenate([pair, odd[:, None]], axis=1)
    else:  # between
        first = rng.integers(0, len(pool.members), size=m)
        g1 = pool.group_of[first]
        second = _outside(rng, pool, [g1])
        g2 = pool.group_of[second]
        third = _outside(rng, pool, [g1, g2])
        pos = np.stack([first, second, third], axis=1)

    pos = np.take_along_axis(pos, _PERMS[rng.integers(0, 6, size=m)], axis=1)
    return pool.members[pos]

"""Odd-one-out triplets with a taxonomy answer, at three kinds of boundary, drawn from a two-level
taxonomy (ceiling 100%: the odd one is whatever the labels say, not what people choose).

These are not the AligNet paper's Levels. Levels is a human-judged dataset (each triplet scored by
agreement with people's choices; human-to-human reliability 61.9% on its global triplets); these
sets are a different measurement, and their names say what they are. The paper's Levels figures
are printed only beside results on human-judged data with per-triplet response distributions
(`evaluate.sets` with `distributions`, alignet_core/evaluate/sets.py).

From any pool labelled with a coarse category and a fine class (the demo: 9 emoji categories, 98
subcategories; a user's coarse → fine label columns), each triplet (i, j, k) with k the odd one:

- `category_boundary`: i and j from one coarse category but from **different** fine classes; k
  from another coarse category. Right only if the model groups by the coarse category, with no
  shared fine class to lean on.
- `sibling_boundary`: all three from one coarse category; i and j from one fine class, k from a
  **sibling** fine class (same category, another class). Fine distinctions inside a category.
- `class_boundary`: i and j from one fine class, k from **any other** fine class of the pool (two
  images of one class, one of another class). Most such k lie in another category, so this is the
  easiest.

The names before issue 30 were `global`, `local` and `class_boundary`; `global` and `local` are
refused with a message naming the new ones (`alignet_core.config.human.RENAMED_LEVELS`), since they invited a comparison with the
paper's human-judged global and local figures.

Sampling is uniform: the anchor i uniform over pool items that admit the level, j and k uniform
over their allowed sets. Deterministic for a seed; vectorized (index arithmetic over the pool
sorted by (coarse, fine), where every category and every class is a contiguous range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from alignet_core.errors import InputError

Level = Literal["category_boundary", "sibling_boundary", "class_boundary"]
LEVELS: tuple[Level, ...] = ("category_boundary", "sibling_boundary", "class_boundary")
#: how reports describe every level: what its answer is and its ceiling
KIND = "taxonomy answer, ceiling 100%"


def _as_labels(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise InputError(f"{what}: expected a 1-d array of labels, got shape {a.shape}")
    return np.unique(a, return_inverse=True)[1].astype(np.int64)


def _draw_outside(
    rng: np.random.Generator, order: np.ndarray, lo: np.ndarray, hi: np.ndarray, start: np.ndarray, stop: np.ndarray
) -> np.ndarray:
    """Uniform draw from `order[lo:hi]` minus the sub-range `order[start:stop]` (row-wise)."""
    width = (hi - lo) - (stop - start)
    r = lo + np.floor(rng.random(len(lo)) * width).astype(np.int64)
    r = np.where(r >= start, r + (stop - start), r)
    return order[np.minimum(r, len(order) - 1)]


def _draw_inside_but(rng: np.random.Generator, order: np.ndarray, start: np.ndarray, stop: np.ndarray,
                     at: np.ndarray) -> np.ndarray:
    """Uniform draw from `order[start:stop]` minus the position `at` (row-wise)."""
    size = stop - start
    return order[start + (at - start + 1 + np.floor(rng.random(len(at)) * (size - 1)).astype(np.int64)) % size]


@dataclass(frozen=True)
class _Pool:
    """A pool sorted by (coarse, fine): per sorted position, its class range [fs, fe) and category
    range [cs, ce); `order[pos]` is the index into `items` of the item at that position."""

    items: np.ndarray
    order: np.ndarray
    fs: np.ndarray
    fe: np.ndarray
    cs: np.ndarray
    ce: np.ndarray


def _pool(coarse: np.ndarray, fine: np.ndarray, pool: np.ndarray | None) -> _Pool:
    c_all, f_all = _as_labels(coarse, "coarse"), _as_labels(fine, "fine")
    if len(c_all) != len(f_all):
        raise InputError(f"coarse and fine labels differ in length: {len(c_all)} and {len(f_all)}")
    pairs = np.unique(np.stack([f_all, c_all], 1), axis=0)
    if len(np.unique(pairs[:, 0])) != len(pairs):
        bad = int(pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0])
        raise InputError(f"fine class #{bad} spans several coarse categories; fine classes must nest in coarse ones")
    items = np.arange(len(c_all)) if pool is None else np.unique(np.asarray(pool, dtype=np.int64))
    c, f = c_all[items], f_all[items]
    n = len(items)
    order = np.lexsort((f, c))
    cs_, fs_ = c[order], f[order]
    f_key = np.r_[True, (fs_[1:] != fs_[:-1]) | (cs_[1:] != cs_[:-1])] if n else np.zeros(0, bool)
    c_key = np.r_[True, cs_[1:] != cs_[:-1]] if n else np.zeros(0, bool)
    f_bounds, c_bounds = np.r_[np.flatnonzero(f_key), n], np.r_[np.flatnonzero(c_key), n]
    f_id, c_id = np.cumsum(f_key) - 1, np.cumsum(c_key) - 1
    return _Pool(items=items, order=order, fs=f_bounds[f_id], fe=f_bounds[f_id + 1], cs=c_bounds[c_id],
                 ce=c_bounds[c_id + 1])


def _anchors(p: _Pool, level: Level) -> np.ndarray:
    """Sorted positions that can be the first item of a `level` triplet."""
    n = len(p.items)
    size_f, size_c = p.fe - p.fs, p.ce - p.cs
    if level == "category_boundary":
        ok = (size_c - size_f >= 1) & (n - size_c >= 1)
    elif level == "sibling_boundary":
        ok = (size_f >= 2) & (size_c - size_f >= 1)
    elif level == "class_boundary":
        ok = (size_f >= 2) & (n - size_f >= 1)
    else:
        raise InputError(f"level: expected one of {LEVELS}, got {level!r}")
    return np.flatnonzero(ok)


def admits(coarse: np.ndarray, fine: np.ndarray, level: Level, pool: np.ndarray | None = None) -> bool:
    """Whether the items `pool` (default all) hold at least one triplet of `level`."""
    return len(_anchors(_pool(coarse, fine, pool), level)) > 0


def level_triplets(
    coarse: np.ndarray,
    fine: np.ndarray,
    level: Level,
    n_triplets: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """`n_triplets` triplets of `level` (see the module doc) over the items `pool` (default: all).

    coarse, fine: (n,) labels of every item (any dtype); fine classes must nest in coarse
    categories (`InputError` naming a class that spans two). pool: (m,) item rows to draw from.
    Returns (n_triplets, 3) int64 item rows, the taxonomy's odd one in column 2. `InputError` when
    the pool has no triplet of this level (e.g. one category only, for `global`).
    """
    p = _pool(coarse, fine, pool)
    anchors = _anchors(p, level)
    if n_triplets <= 0:
        return np.zeros((0, 3), np.int64)
    if len(anchors) == 0:
        raise InputError(f"no {level} triplet can be drawn from these {len(p.items)} items (their categories and "
                         "classes do not admit one)")
    order, n = p.order, len(p.items)
    a = anchors[rng.integers(0, len(anchors), n_triplets)]
    zero, full = np.zeros(n_triplets, np.int64), np.full(n_triplets, n)
    if level == "category_boundary":
        b = _draw_outside(rng, order, p.cs[a], p.ce[a], p.fs[a], p.fe[a])
        k = _draw_outside(rng, order, zero, full, p.cs[a], p.ce[a])
    elif level == "sibling_boundary":
        b = _draw_inside_but(rng, order, p.fs[a], p.fe[a], a)
        k = _draw_outside(rng, order, p.cs[a], p.ce[a], p.fs[a], p.fe[a])
    else:
        b = _draw_inside_but(rng, order, p.fs[a], p.fe[a], a)
        k = _draw_outside(rng, order, zero, full, p.fs[a], p.fe[a])
    return np.stack([p.items[order[a]], p.items[b], p.items[k]], axis=1).astype(np.int64)


def check_level(coarse: np.ndarray, fine: np.ndarray, level: Level, triplets: np.ndarray) -> np.ndarray:
    """(t,) bool: which rows satisfy `level`'s definition (the odd one in column 2)."""
    c, f = np.asarray(coarse)[triplets], np.asarray(fine)[triplets]  # (t, 3)
    same_c01, same_f01 = c[:, 0] == c[:, 1], f[:, 0] == f[:, 1]
    distinct = (triplets[:, 0] != triplets[:, 1]) & (triplets[:, 0] != triplets[:, 2]) & (triplets[:, 1] != triplets[:, 2])
    if level == "category_boundary":
        return distinct & same_c01 & ~same_f01 & (c[:, 2] != c[:, 0])
    if level == "sibling_boundary":
        return distinct & same_f01 & (c[:, 2] == c[:, 0]) & (f[:, 2] != f[:, 0])
    return distinct & same_f01 & (f[:, 2] != f[:, 0])

"""Exactly the number of distinct triplets asked for, per published split.

Shards draw triplets at random, so a split's draws hold duplicates (the same three images in any
order) and rows dropped for a tied maximum, and a valid split may repeat train triplets. The split
keeps the first occurrence of each distinct triplet in draw order (shards by index) and, when that
is short of the count asked, draws top-up shards: shard indices after the planned ones, of the
same split seed, each sized from the deficit (so a rerun draws exactly the same ones), until the
count is reached; the surplus of the last top-up is cut off in draw order. A pool that cannot supply
the count (too few images or groups) is an `InputError` naming `sample.n_<split>` after
`MAX_TOP_UPS` growing top-ups. Every count is reported: draws, ties, duplicates, train repeats,
top-up shards, surplus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from alignet_core.errors import ConfigError, InputError
from alignet_core.sample.shards import ShardSpec, read_shard, shard_path

log = logging.getLogger(__name__)

MAX_TOP_UPS = 6  # top-up shards per split before the pool is declared too small
MIN_TOP_UP = 1000  # triplets in the smallest top-up shard (the size doubles with each top-up)


def triplet_keys(indices: np.ndarray, n_images: int) -> np.ndarray:
    """One comparable key per triplet, equal for the same unordered set of images.

    indices: (m, 3) int in [0, n_images). Returns (m,) int64 (three 21-bit fields) when
    n_images ≤ 2**21, else a structured array of three sorted int64 fields; the key type
    depends only on n_images, so keys of two splits of one pool are always comparable.
    """
    s = np.sort(np.asarray(indices, dtype=np.int64), axis=1)
    if n_images <= (1 << 21):
        return (s[:, 0] << 42) | (s[:, 1] << 21) | s[:, 2]
    keys = np.empty(len(s), dtype=[("a", np.int64), ("b", np.int64), ("c", np.int64)])
    keys["a"], keys["b"], keys["c"] = s[:, 0], s[:, 1], s[:, 2]
    return keys


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Sorted row numbers of the first occurrence of each distinct key. keys: (m,)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _read(out_dir: str, specs: list[ShardSpec]) -> tuple[np.ndarray, np.ndarray, int]:
    """The shards' rows in index order: indices (m, 3) int64, similarities (m, 3) float32, ties dropped."""
    parts = [read_shard(shard_path(out_dir, s)) for s in sorted(specs, key=lambda s: s.index)]
    if not parts:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32), 0
    return (np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]).astype(np.float32), sum(p[3] for p in parts))


def distinct_split(
    out_dir: str,
    specs: list[ShardSpec],
    n_images: int,
    dedupe: bool = True,
    exclude: np.ndarray | None = None,
    top_up: Callable[[ShardSpec], object] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """One split of one strategy from its finished shards: distinct triplets (with `dedupe`) not in
    `exclude` (keys of the train split, for valid), topped up to exactly the count the shards asked
    for when `top_up` is given (it makes a shard's file, e.g. `run_shard`).

    Returns (indices (k, 3) int64, similarities (k, 3) float32, keys (k,), counts) with k = the
    count asked when topped up. counts: requested, drawn, ties_dropped, duplicates_removed,
    in_train_removed, top_up_shards, surplus_dropped, n_triplets."""
    indices = sorted(s.index for s in specs)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"shard specs repeat an index for {specs[0].strategy}/{specs[0].split}: {indices}")
    target = sum(s.n for s in specs)
    idx, sims, ties = _read(out_dir, specs)
    drawn, n_top = target, 0
    while True:
        if len(idx) and idx.max() >= n_images:
            raise InputError(f"{specs[0].strategy}/{specs[0].split}: index {int(idx.max())} but only {n_images} images")
        keys = triplet_keys(idx, n_images)
        keep = first_occurrences(keys) if dedupe else np.arange(len(idx))
        leak = np.isin(keys[keep], exclude) if exclude is not None and len(keep) else np.zeros(len(keep), bool)
        good = keep[~leak]
        if top_up is None or len(good) >= target:
            break
        if n_top == MAX_TOP_UPS:
            s = specs[0]
            raise InputError(
                f"sample.n_{s.split}: {s.strategy} can supply only {len(good)} distinct {s.split} triplets"
                f"{' not in train' if exclude is not None else ''} of the {target} asked, after {drawn} draws "
                f"({MAX_TOP_UPS} top-up shards); ask for fewer (sample.n_{s.split}) or sample a larger pool "
                "(more images, more clusters or classes)")
        spec = ShardSpec(specs[0].strategy, specs[0].split, indices[-1] + 1 + n_top,
                         max(4 * (target - len(good)), MIN_TOP_UP) * 2**n_top, specs[0].seed)
        top_up(spec)
        more, more_sims, more_ties = _read(out_dir, [spec])
        idx, sims = np.concatenate([idx, more]), np.concatenate([sims, more_sims])
        ties, drawn, n_top = ties + more_ties, drawn + spec.n, n_top + 1
        log.info("%s/%s: %d distinct of %d asked; top-up shard %s drew %d more", spec.strategy, spec.split,
                 len(good), target, spec.name, spec.n)
    surplus = max(len(good) - target, 0) if top_up is not None else 0
    good = good[: len(good) - surplus]
    counts = {"requested": target, "drawn": drawn, "ties_dropped": ties, "duplicates_removed": len(idx) - len(keep),
              "in_train_removed": int(leak.sum()), "top_up_shards": n_top, "surplus_dropped": surplus,
              "n_triplets": int(len(good))}
    return idx[good], sims[good], keys[good], counts

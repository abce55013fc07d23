"""Teacher responses (stage 3): pairwise similarities of sampled triplets and odd-one-out order.

The teacher is the human-aligned (transformed) embedding space; its response to a triplet is the
three dot products [s01, s02, s12]. Dot products, not cosines: the transform was fitted so that
softmax of these dot products (temperature 1) matches human choice probabilities, and the
student's loss uses them as stored (docs/method.md, stage 4).

The odd one out is the image outside the most similar pair; rows are reordered so that pair is
(0, 1) and image 2 is the odd one out, with s01 *strictly* largest: the official triplet-accuracy
metric counts a tie as wrong, so a row with a tied maximum has no defined answer and is dropped.

Workers never copy a whole store. A raw local store (as the transform stage writes it) is
memory-mapped (`embedding_store.RawChunkReader.map_rows`): the shard's rows are gathered straight from the
kernel's page cache, shared by the workers of one machine, with no private copy. Any other store
goes through `gather_rows`, which reads only the sorted unique rows a shard needs, chunk by chunk
(one contiguous read per chunk holding any of them), in the store's dtype.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from alignet_core.errors import InputError
from alignet_core.io.embedding_store import RawChunkReader, gather_rows
from alignet_core.io.formats import order_by_similarity
from alignet_core.sample import native

log = logging.getLogger(__name__)

#: triplets per block of numpy's dot products (no C kernel): buffers of 3 × 1024 × p float16 + float32
#: rows and the block's products (17 MB at p = 768)
DOT_BLOCK_TRIPLETS = 1024
#: the lanes of pair_dots.c's sums (its LANES): the order of the additions, so the numpy path's bits
DOT_LANES = 16


def teacher_similarities(triplets: np.ndarray, embeddings: Any) -> np.ndarray:
    """Teacher dot-product similarities of each triplet.

    triplets: (m, 3) int rows into the store; embeddings: (n, p) zarr.Array or np.ndarray,
    float16/float32 (the transformed teacher embeddings). Returns (m, 3) float32
    [s01, s02, s12] = [e0·e1, e0·e2, e1·e2], computed in float32 from the gathered rows.
    A raw local float16/float32 store is memory-mapped and its rows gathered from the map
    (`embedding_store.RawChunkReader.map_rows`; the kernel pages in only the pages touched): 1.5× faster
    per shard than copying the rows out first (`row_paths` in
    `benchmarks/results/sampling_full.json`), and no private copy of them. Otherwise only the
    chunks holding rows named by the triplets are read (see `gather_rows`) and the rows kept in
    the store's own dtype (u × p × 2 bytes for float16). Either way `pair_dots` takes the products
    in float32, in one fixed order.
    """
    t = np.asarray(triplets)
    if t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"triplets: expected shape (m, 3), got {t.shape}")
    if len(t) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"triplets: expected integer rows, got {t.dtype}")
    shape = getattr(embeddings, "shape", None)
    if shape is None or len(shape) != 2:
        raise InputError(f"embeddings: expected a 2-d (n, p) array, got shape {shape}")
    n = shape[0]
    if t.min() < 0 or t.max() >= n:
        raise InputError(f"triplets: row indices must lie in [0, {n}), got [{t.min()}, {t.max()}]")
    store_dtype = np.dtype(getattr(embeddings, "dtype", np.float32))
    keep = store_dtype if store_dtype in (np.dtype(np.float16), np.dtype(np.float32)) else np.dtype(np.float32)
    raw = RawChunkReader.for_array(embeddings) if keep == store_dtype else None
    mapped = raw.map_rows() if raw is not None else None
    if mapped is not None:
        return pair_dots(mapped, t)
    return copied_row_similarities(t, embeddings, keep)


def copied_row_similarities(triplets: np.ndarray, embeddings: Any, dtype: Any) -> np.ndarray:
    """`teacher_similarities` without the memory map: the triplets' distinct rows are copied out
    chunk by chunk (`gather_rows`, kept in `dtype`) and their dot products taken. The path for
    compressed or remote stores; also the baseline `benchmarks/sampling.py` times the map against."""
    rows, local = _distinct_rows(np.asarray(triplets, dtype=np.int64), embeddings.shape[0])
    return pair_dots(gather_rows(embeddings, rows, dtype=dtype), local)


def _distinct_rows(t: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct rows of t, t's entries as positions in them), like np.unique with
    return_inverse. When the store is not much larger than the triplets, a mark-and-count pass
    over n rows replaces the sort (O(n) instead of O(m log m); ~10× faster for 1.5M entries
    of a 1M-row store)."""
    if n > 16 * t.size:
        rows, local = np.unique(t, return_inverse=True)
        return rows, local.reshape(t.shape)
    seen = np.zeros(n, dtype=bool)
    seen[t.ravel()] = True
    rows = np.flatnonzero(seen)
    position = np.cumsum(seen, dtype=np.int64) - 1
    return rows, position[t]


def pair_dots(e: np.ndarray, local: np.ndarray, block: int = DOT_BLOCK_TRIPLETS) -> np.ndarray:
    """[e_a·e_b, e_a·e_c, e_b·e_c] for each row (a, b, c) of `local`, summed in float32 in one fixed order.

    e: (u, p) float16/float32; local: (m, 3) int rows of e. Returns (m, 3) float32.
    The C kernel (`native.py`, `pair_dots.c`) reads each row once; where it cannot be built, numpy runs the
    same additions in the same order (`_fixed_order_dots`) on blocks of `block` triplets: the same bits
    either way, on any CPU.
    """
    x = np.asarray(e)
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    t = np.ascontiguousarray(local, dtype=np.int64)
    if t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"triplets: expected shape (m, 3), got {t.shape}")
    if len(t) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    if t.min() < 0 or t.max() >= len(x):
        raise InputError(f"triplets: row indices must lie in [0, {len(x)}), got [{t.min()}, {t.max()}]")
    x = np.ascontiguousarray(x)
    lib = native.library()
    if lib is not None:
        return native.pair_dots(lib, x, t)
    return _numpy_pair_dots(x, t, block)


def _numpy_pair_dots(e: np.ndarray, t: np.ndarray, block: int) -> np.ndarray:
    """`pair_dots` without the C kernel: blocks of rows gathered and converted to float32 in reused buffers
    (Dask workers run with glibc's MALLOC_TRIM_THRESHOLD_ at 64 KiB, under which every fresh multi-megabyte
    temporary is a new mapping whose pages fault in again), then summed by `_fixed_order_dots`."""
    import torch

    m, p = len(t), e.shape[1]
    out = np.empty((m, 3), dtype=np.float32)
    with warnings.catch_warnings():  # torch warns on read-only arrays (memory maps); rows are only read
        warnings.simplefilter("ignore", UserWarning)
        et = torch.from_numpy(e)
    flat = torch.from_numpy(t.reshape(-1))
    b = min(block, m)
    gathered = torch.empty((3 * b, p), dtype=et.dtype)
    as32 = gathered if et.dtype == torch.float32 else torch.empty((3 * b, p), dtype=torch.float32)
    rows32 = as32.numpy()
    for lo in range(0, m, b):
        n = min(b, m - lo)
        torch.index_select(et, 0, flat[3 * lo : 3 * (lo + n)], out=gathered[: 3 * n])
        if as32 is not gathered:
            as32[: 3 * n].copy_(gathered[: 3 * n])
        x = rows32[: 3 * n].reshape(n, 3, p)
        for j, (u, v) in enumerate(((0, 1), (0, 2), (1, 2))):
            out[lo : lo + n, j] = _fixed_order_dots(x[:, u], x[:, v])
    return out


def _fixed_order_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise float32 dot products of (n, p) x and y, added in pair_dots.c's order: lane l of 16 sums the
    products at k ≡ l (mod 16) in increasing k from 0; the lanes are added as a tree (w[l] += w[l + h] for
    h = 8, 4, 2, 1); the last p mod 16 products follow one by one. Every step is a float32 product or sum."""
    n, p = x.shape
    whole = p - p % DOT_LANES
    prod = (x[:, :whole] * y[:, :whole]).reshape(n, whole // DOT_LANES, DOT_LANES)
    acc = np.zeros((n, DOT_LANES), dtype=np.float32)
    for j in range(whole // DOT_LANES):
        acc += prod[:, j]
    h = DOT_LANES // 2
    while h >= 1:
        acc = acc[:, :h] + acc[:, h : 2 * h]
        h //= 2
    r = acc[:, 0].copy()
    for k in range(whole, p):
        r += x[:, k] * y[:, k]
    return r


def order_triplets(triplets: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Put each triplet's most similar pair first (image 2 = odd one out); drop tied rows.

    triplets: (m, 3) int; sims: (m, 3) float [s01, s02, s12] in the triplets' order.
    Returns (triplets' (m', 3) int64, sims' (m', 3) float32, n_dropped_ties) where every kept row
    has s01' > s02' and s01' > s12' strictly; rows whose largest similarity is tied are dropped
    (the official metric has no right answer for them). Row order is otherwise kept.
    """
    t = np.asarray(triplets, dtype=np.int64)
    s = np.asarray(sims, dtype=np.float32)
    if t.shape != s.shape or t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"triplets {t.shape} and similarities {s.shape} must both have shape (m, 3)")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).any(1).sum())
        raise InputError(f"similarities: {bad} rows hold NaN or inf; the embeddings are not finite")
    t2, s2, _ = order_by_similarity(t, s)
    strict = (s2[:, 0] > s2[:, 1]) & (s2[:, 0] > s2[:, 2])
    n_ties = int(len(strict) - strict.sum())
    if n_ties:
        log.info("dropped %d of %d triplets whose largest similarity is tied", n_ties, len(t))
    return t2[strict], s2[strict], n_ties

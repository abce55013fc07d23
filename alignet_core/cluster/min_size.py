"""No degenerate clusters: every k-means cluster holds at least `cluster.min_cluster_size` images.

k-means can end with a tiny cluster (k = 12 on the 1,906 demo emoji gave a 2-image one), and the
cluster sampling strategies then lean on it: a cluster-border triplet takes two images from one
cluster, so a 2-image cluster supplies the same pair again and again. FAISS's k-means avoids empty
clusters during training by splitting a large cluster in two (its `min_points_per_centroid` idea,
applied to the final assignment here): a cluster below the minimum is *dissolved* (each of its
images goes to its nearest other centroid) and its centroid is *re-seeded* by splitting the largest
cluster at the median of its images' projection on their first principal axis, so both halves hold
at least the minimum whenever the largest holds twice that. Each step removes one small cluster and
makes none (the other clusters only grow), so it ends after at most k steps; the clusters keep
their number k. Memory: the rows of one cluster at a time.
"""

from __future__ import annotations

import logging

import numpy as np

from alignet_core.io import embedding_store
from alignet_core.io.embedding_store import gather_rows

log = logging.getLogger(__name__)


def _rows(emb: object, rows: np.ndarray, spherical: bool) -> np.ndarray:
    """(u, p) float32 rows of the store, L2-normalized for spherical k-means."""
    x = gather_rows(emb, np.sort(rows))
    if spherical:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def _distance(x: np.ndarray, c: np.ndarray, spherical: bool) -> np.ndarray:
    """(u, k') distances of rows x (u, p) to centroids c (k', p): squared L2, or 1 − cosine."""
    if spherical:
        return 1.0 - x @ c.T
    return np.maximum((x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def _centre(x: np.ndarray, spherical: bool) -> np.ndarray:
    c = x.mean(0)
    if spherical:
        c = c / max(float(np.linalg.norm(c)), 1e-12)
    return c.astype(np.float32)


def enforce_min_cluster_size(
    store_url: str, centroids: np.ndarray, assignments: np.ndarray, distances: np.ndarray, min_size: int,
    spherical: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, list[dict[str, int]]]:
    """Re-seed every cluster smaller than `min_size` (see the module doc).

    centroids: (k, p) float32; assignments: (n,) int64 (-1 invalid); distances: (n,) float32.
    A pool too small for k clusters of `min_size` (fewer than 2 · k · min_size images) gets the
    largest minimum it can hold, n // (2k), so the largest cluster can always be split in two.
    Returns new (centroids, assignments, distances), the minimum enforced, and one record per
    re-seeded cluster ({'cluster', 'size', 'split'}: its size before, the cluster split for it)."""
    c, a, d = centroids.copy(), assignments.copy(), distances.copy()
    k = len(c)
    n = int((a >= 0).sum())
    if min(min_size, n // (2 * k)) < min_size:
        log.info("k-means: cluster.min_cluster_size %d lowered to %d: %d images cannot hold %d clusters of %d "
                 "with room to split the largest", min_size, n // (2 * k), n, k, min_size)
        min_size = n // (2 * k)
    if min_size <= 1:
        return c, a, d, max(min_size, 0), []
    emb = embedding_store.open_embeddings(store_url)["embeddings"]
    reseeded: list[dict[str, int]] = []
    for _ in range(k):
        sizes = np.bincount(a[a >= 0], minlength=k)
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            break
        big = int(np.argmax(sizes))  # at least n / k ≥ 2 · min_size images
        reseeded.append({"cluster": small, "size": int(sizes[small]), "split": big})
        rows = np.flatnonzero(a == small)
        if len(rows):  # dissolve: each image to its nearest other centroid
            x = _rows(emb, rows, spherical)
            others = np.delete(np.arange(k), small)
            dist = _distance(x, c[others], spherical)
            near = dist.argmin(1)
            a[rows], d[rows] = others[near], dist[np.arange(len(rows)), near]
        rows = np.flatnonzero(a == big)  # split the largest at the median of its first principal axis
        x = _rows(emb, rows, spherical)
        centred = x - x.mean(0)
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        order = np.argsort(centred @ axis, kind="stable")
        half = order[len(order) // 2:]
        keep = order[: len(order) // 2]
        c[big], c[small] = _centre(x[keep], spherical), _centre(x[half], spherical)
        a[rows[half]] = small
        d[rows[keep]] = _distance(x[keep], c[big][None], spherical)[:, 0]
        d[rows[half]] = _distance(x[half], c[small][None], spherical)[:, 0]
        log.info("k-means: cluster %d had %d images (< cluster.min_cluster_size %d): dissolved, re-seeded by "
                 "splitting cluster %d (%d images)", small, int(sizes[small]), min_size, big, int(sizes[big]))
    return c, a, d, min_size, reseeded

"""Superordinate clusters (stage 2): k-means on the transformed embeddings with FAISS.

The paper clusters the teacher's human-aligned embeddings of the image pool (ImageNet-1k train,
k = 500) and samples "cluster" and "cluster border" triplets from the clusters. Here:

- `fit_kmeans` trains FAISS k-means on a random subsample of at most
  k × max_points_per_centroid *valid* rows (FAISS's own rule of thumb: more points per centroid
  barely move the centroids), read block by block from the store, so training memory depends on
  k, not on the pool size. Where it runs is `hardware.kmeans_backend`'s choice: FAISS on its
  GPUs when it has any, else `kmeans_torch` on a CUDA GPU torch sees (the same init and Lloyd
  iterations, in torch), else FAISS on the CPU.
  Centroids start from greedy k-means++ (`greedy_kmeans_plusplus`: 2 + ln k candidates per
  centre, the rule scikit-learn's `kmeans_plusplus` uses) on the training rows. FAISS's random
  init, and its own k-means++ (one candidate per centre), often merge two well-separated groups
  into one cluster and split another, and Lloyd iterations never recover
  (`tests/cluster/test_cluster.py`: 60 separated blobs, recovered exactly from the greedy init for
  every seed tried). The init reads the training rows once per centre, so it is bound by memory
  bandwidth, not FLOPs; it is written here in float32 because scikit-learn's version upcasts
  float32 distances to float64 and was 3.1× slower on the same rows
  (`benchmarks/results/kmeans_quick.json`, `pipeline.init`).
- `assign_clusters` then streams the whole store chunk by chunk and assigns every valid row to
  its nearest centroid with an exact flat index; memory is one chunk plus the (n,) outputs.
- `min_size.enforce_min_cluster_size` then re-seeds any cluster below `cluster.min_cluster_size`
  (dissolved into its neighbours, replaced by one half of the largest cluster).
- Rows with valid = False (undecodable images, stored as zeros) are never trained on and get
  assignment -1 and distance NaN, so they can never be sampled.

Spherical (cosine) k-means L2-normalizes the rows before training and assignment (FAISS's
`spherical` flag only normalizes the centroids; normalizing the data too makes the objective the
cosine one) and reports distance 1 − cosine; otherwise distances are squared L2.

Deterministic for a seed: the subsample comes from ``default_rng([seed, 0])`` and restart r's
init from ``SeedSequence([seed, r])``; CPU FAISS k-means is deterministic for a given input
(GPU runs may differ in the last bits: their sums are added in a varying order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import zarr

from alignet_core.cluster.min_size import enforce_min_cluster_size
from alignet_core.config.cluster import ClusterConfig
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.hardware import KMeansBackend, kmeans_backend
from alignet_core.io import embedding_store, store
from alignet_core.io.embedding_store import gather_rows
from alignet_core.runtime.progress import ProgressLog

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import faiss


def _faiss() -> ModuleType:
    """FAISS, imported where it is used, so that the torch path (a CUDA GPU) runs where FAISS is not
    installed (the GPU machines' images have none); `ConfigError` when the FAISS path needs it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "cluster: k-means on the CPU needs FAISS, which is not installed (pip install faiss-cpu); "
            "on a machine where torch sees a CUDA GPU, cluster.use_gpu 'auto' runs it in torch instead"
        ) from None
    return faiss


@dataclass
class KMeansResult:
    """k-means of an embedding store: centroids, per-row assignments and the training curve."""

    centroids: np.ndarray  # (k, p) float32
    assignments: np.ndarray  # (n,) int64, -1 for invalid rows
    distances: np.ndarray  # (n,) float32 squared L2 (or 1 - cosine when spherical), nan for invalid
    sizes: np.ndarray  # (k,) int64
    inertia_curve: list[float] = field(default_factory=list)  # objective per iteration (faiss obj)
    min_cluster_size: int = 0  # the minimum enforced after assignment (`min_size`)
    reseeded: list[dict[str, int]] = field(default_factory=list)  # clusters re-seeded to reach it


def _normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalization in place; zero rows stay zero. x: (m, p) float32."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _valid_rows(g: zarr.Group, store_url: str) -> np.ndarray:
    valid = np.asarray(g["valid"][:], dtype=bool)
    n = g["embeddings"].shape[0]
    if valid.shape != (n,):
        raise StoreError(f"{store_url!r}: 'valid' has shape {valid.shape}, expected ({n},)")
    return valid


def greedy_kmeans_plusplus(x: np.ndarray, k: int, seed: int, n_trials: int | None = None) -> np.ndarray:
    """k initial centroids from the rows of x (n, p) float32 by greedy k-means++ (Arthur &
    Vassilvitskii; greedy variant as in scikit-learn).

    Each new centre is the best, by the resulting potential (sum of squared distances to the
    nearest centre), of `n_trials` rows drawn with probability ∝ that squared distance
    (default 2 + ⌊ln k⌋). Returns (k, p) float32 copies of the chosen rows; deterministic for a seed.
    """
    n = len(x)
    if not 0 < k <= n:
        raise ConfigError(f"cluster.k = {k}: k-means++ needs 1 ≤ k ≤ {n} rows")
    trials = n_trials or 2 + int(np.log(k))
    rng = np.random.default_rng(seed)
    sq = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    closest = np.maximum(sq - 2 * (x @ x[chosen[0]]) + sq[chosen[0]], 0)  # (n,) squared distance to the nearest centre
    for c in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        if cum[-1] <= 0:  # every row sits on a centre already: take any row not chosen yet
            chosen[c] = np.setdiff1d(np.arange(n), chosen[:c])[0]
            continue
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        d = x[cand] @ x.T  # (trials, n): the one pass over the rows this centre costs
        d *= -2
        d += sq
        d += sq[cand, None]
        np.maximum(d, 0, out=d)
        np.minimum(d, closest, out=d)
        best = int(np.argmin(d.sum(axis=1, dtype=np.float64)))
        chosen[c], closest = cand[best], d[best].copy()
    return x[chosen].copy()


def fit_kmeans(store_url: str, cfg: ClusterConfig, seed: int,
               backend: KMeansBackend | None = None) -> tuple[np.ndarray, list[float]]:
    """Train k-means centroids on a subsample of the store's valid rows.

    Reads at most cfg.k × cfg.max_points_per_centroid valid rows (uniformly chosen, read in
    blocks). Returns (centroids (k, p) float32, objective per iteration). Raises `ConfigError`
    naming cluster.k when k exceeds the number of valid rows. `backend`: where to run (default
    `hardware.kmeans_backend(cfg.use_gpu)`).
    """
    g = embedding_store.open_embeddings(store_url)
    emb = g["embeddings"]
    n, p = emb.shape
    valid_idx = np.flatnonzero(_valid_rows(g, store_url))
    if cfg.k > len(valid_idx):
        raise ConfigError(
            f"cluster.k = {cfg.k} is larger than the number of valid embeddings in {store_url!r} "
            f"({len(valid_idx)} of {n} rows); lower cluster.k"
        )
    backend = backend or kmeans_backend(cfg.use_gpu)
    n_train = min(len(valid_idx), cfg.k * cfg.max_points_per_centroid)
    rng = np.random.default_rng([int(seed), 0])
    rows = np.sort(rng.choice(valid_idx, size=n_train, replace=False)) if n_train < len(valid_idx) else valid_idx
    x = gather_rows(emb, rows, block_rows=cfg.chunk_rows)
    if not np.isfinite(x).all():
        bad = rows[~np.isfinite(x).all(axis=1)]
        full = np.zeros((n, 1), dtype=np.float32)
        full[bad] = np.nan
        embedding_store.check_finite_rows(full, np.ones(n, dtype=bool), store_url, np.asarray(g["ids"][:]))
    if cfg.spherical:
        _normalize(x)
    if n_train < 39 * cfg.k:
        log.warning("k-means: %d training points for k = %d (FAISS suggests at least %d)", n_train, cfg.k, 39 * cfg.k)
    train = _train_torch if backend.library == "torch" else _train_faiss
    best: tuple[np.ndarray, list[float]] | None = None
    restarts = ProgressLog("k-means fit", "restarts", cfg.nredo)
    restarts.update(0, f" ({n_train:,} rows, k = {cfg.k})")
    for r in range(cfg.nredo):  # restarts from different greedy inits; the best objective wins
        state = int(np.random.SeedSequence([int(seed), r]).generate_state(1)[0])
        centroids, curve = train(x, cfg, state, backend.device)
        # spherical: the objective is the sum of cosine similarities, higher is better
        if best is None or (curve[-1] > best[1][-1] if cfg.spherical else curve[-1] < best[1][-1]):
            best = centroids, curve
        restarts.update(r + 1)
    centroids, curve = best
    log.info("k-means: k=%d on %d of %d valid rows (%s on %s), objective %.4g → %.4g", cfg.k, n_train,
             len(valid_idx), backend.library, backend.device, curve[0], curve[-1])
    return centroids, curve


def _train_faiss(x: np.ndarray, cfg: ClusterConfig, state: int, device: str) -> tuple[np.ndarray, list[float]]:
    """One FAISS k-means run on the training rows from a greedy k-means++ init seeded by `state`."""
    faiss = _faiss()
    init = greedy_kmeans_plusplus(x, cfg.k, state)
    run = faiss.Kmeans(x.shape[1], cfg.k, niter=cfg.niter, seed=state % (2**31), spherical=cfg.spherical,
                       gpu=device == "gpu", max_points_per_centroid=cfg.max_points_per_centroid,
                       min_points_per_centroid=1, verbose=False)
    run.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    return np.ascontiguousarray(run.centroids, dtype=np.float32), [float(v) for v in run.obj]


def _train_torch(x: np.ndarray, cfg: ClusterConfig, state: int, device: str) -> tuple[np.ndarray, list[float]]:
    """The same run as `_train_faiss` with `kmeans_torch` on a torch device."""
    import torch

    from alignet_core.cluster import kmeans_torch
    xt = torch.from_numpy(x).to(device)
    init = kmeans_torch.greedy_kmeans_plusplus(xt, cfg.k, state)
    centroids, curve = kmeans_torch.lloyd(xt, init, cfg.niter, cfg.spherical, state)
    return centroids.cpu().numpy(), curve


def _flat_index(centroids: np.ndarray, spherical: bool, on_gpu: bool) -> "faiss.Index":
    faiss = _faiss()
    k, p = centroids.shape
    index: faiss.Index = faiss.IndexFlatIP(p) if spherical else faiss.IndexFlatL2(p)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    return index


def _nearest_torch(centroids: np.ndarray, spherical: bool, device: str) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """A `search(x, 1)` like FAISS's flat index, computed by `kmeans_torch.nearest` on `device`."""
    import torch

    from alignet_core.cluster import kmeans_torch
    c = torch.from_numpy(centroids).to(device)

    def search(x: np.ndarray, _k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = kmeans_torch.nearest(torch.from_numpy(x).to(device), c, spherical)
        return scores.cpu().numpy()[:, None], idx.cpu().numpy()[:, None]

    return search


def assign_clusters(
    store_url: str, centroids: np.ndarray, chunk_rows: int, spherical: bool, use_gpu: str = "never",
    backend: KMeansBackend | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign every valid row of a store to its nearest centroid, one chunk at a time.

    centroids: (k, p) float; `backend` default `hardware.kmeans_backend(use_gpu)`. Returns (assignments (n,) int64, -1 for invalid rows;
    distances (n,) float32: squared L2, or 1 − cosine when spherical (rows and centroids
    normalized); NaN for invalid rows). Memory: one chunk of chunk_rows × p plus the outputs.
    """
    if chunk_rows <= 0:
        raise ConfigError(f"cluster.chunk_rows: expected a positive number of rows, got {chunk_rows}")
    g = embedding_store.open_embeddings(store_url)
    emb, valid_arr = g["embeddings"], g["valid"]
    n, p = emb.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != p:
        raise InputError(f"centroids: expected shape (k, {p}) to match {store_url!r}, got {c.shape}")
    if spherical:
        c = _normalize(c.copy())
    backend = backend or kmeans_backend(use_gpu)
    if backend.library == "torch":
        search = _nearest_torch(c, spherical, backend.device)
    else:
        search = _flat_index(c, spherical, backend.device == "gpu").search
    assignments = np.full(n, -1, dtype=np.int64)
    distances = np.full(n, np.nan, dtype=np.float32)
    ids = None
    rows_done = ProgressLog("k-means assign", "rows", n)
    rows_done.update(0)
    for _, start, stop in embedding_store.iter_chunks(n, chunk_rows):
        ok = np.asarray(valid_arr[start:stop], dtype=bool)
        if not ok.any():
            rows_done.update(stop)
            continue
        chunk = np.asarray(emb[start:stop])
        if not np.isfinite(chunk[ok]).all():
            ids = np.asarray(g["ids"][:]) if ids is None else ids
            embedding_store.check_finite_rows(chunk, ok, store_url, ids, offset=start)
        every = bool(ok.all())
        x = np.ascontiguousarray(chunk if every else chunk[ok], dtype=np.float32)
        if spherical:
            _normalize(x)
        d, i = search(x, 1)
        rows = slice(start, stop) if every else start + np.flatnonzero(ok)
        assignments[rows] = i[:, 0]
        distances[rows] = (1.0 - d[:, 0]) if spherical else np.maximum(d[:, 0], 0.0)
        rows_done.update(stop)
    return assignments, distances


def run_kmeans(store_url: str, cfg: ClusterConfig, seed: int, backend: KMeansBackend | None = None) -> KMeansResult:
    """Fit k-means on a subsample, then assign the whole store in chunks (see the module doc)."""
    backend = backend or kmeans_backend(cfg.use_gpu)
    centroids, curve = fit_kmeans(store_url, cfg, seed, backend)
    assignments, distances = assign_clusters(store_url, centroids, cfg.chunk_rows, cfg.spherical, backend=backend)
    centroids, assignments, distances, min_size, reseeded = enforce_min_cluster_size(
        store_url, centroids, assignments, distances, cfg.min_cluster_size, cfg.spherical)
    sizes = np.bincount(assignments[assignments >= 0], minlength=cfg.k).astype(np.int64)
    if (sizes == 0).any():
        log.warning("k-means: %d of %d clusters are empty after assignment", int((sizes == 0).sum()), cfg.k)
    return KMeansResult(centroids, assignments, distances, sizes, curve, min_size, reseeded)


# ----------------------------------------------------------------------------- persistence
_ARRAYS = ("centroids", "assignments", "distances", "sizes")


def save_kmeans(result: KMeansResult, dir_url: str) -> dict:
    """Write a result as `<dir>/{centroids,assignments,distances,sizes}.npy` + `kmeans.json`.

    `assignments.npy` is the (n,) int64 groups file that `sample.shards.run_shard` reads for the
    cluster strategies. Returns the JSON summary (k, sizes, inertia curve, final inertia).
    """
    store.makedirs(dir_url)
    for name in _ARRAYS:  # each file whole or not at all
        store.write_npy(store.join(dir_url, f"{name}.npy"), getattr(result, name))
    summary = {
        "k": int(len(result.centroids)),
        "n_rows": int(len(result.assignments)),
        "n_assigned": int((result.assignments >= 0).sum()),
        "sizes": result.sizes.tolist(),
        "inertia_curve": list(result.inertia_curve),
        "inertia": float(np.nansum(result.distances)),
        "min_cluster_size": int(result.min_cluster_size),
        "reseeded": list(result.reseeded),
    }
    store.write_json_atomic(store.join(dir_url, "kmeans.json"), summary)
    return summary


def load_kmeans(dir_url: str) -> KMeansResult:
    """Read a result written by `save_kmeans`; `StoreError` naming the missing file."""
    arrays = {}
    for name in _ARRAYS:
        url = store.join(dir_url, f"{name}.npy")
        try:
            with fsspec.open(url, "rb") as f:
                arrays[name] = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise StoreError(f"{url!r} does not exist: the clustering stage did not finish") from None
    summary = store.read_json(store.join(dir_url, "kmeans.json"))
    return KMeansResult(inertia_curve=[float(v) for v in summary["inertia_curve"]],
                        min_cluster_size=int(summary.get("min_cluster_size", 0)),
                        reseeded=list(summary.get("reseeded", [])), **arrays)

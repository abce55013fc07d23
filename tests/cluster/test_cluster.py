"""k-means with real FAISS on real Zarr embedding stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from alignet_core.cluster.kmeans import (
    _train_faiss,
    assign_clusters,
    fit_kmeans,
    greedy_kmeans_plusplus,
    load_kmeans,
    run_kmeans,
    save_kmeans,
)
from alignet_core.config.cluster import ClusterConfig
from alignet_core.errors import ConfigError
from alignet_core.io import embedding_store
from tests.generated_embeddings import blobs, make_store


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray, np.ndarray]:
    x, labels = blobs(1500, 6, 16, seed=0)
    valid = np.random.default_rng(1).random(1500) > 0.05
    url = make_store(str(tmp_path_factory.mktemp("cluster") / "emb.zarr"), x, valid, dtype="float16")
    return url, labels, valid


def test_kmeans_recovers_blobs(blob_store: tuple[str, np.ndarray, np.ndarray]) -> None:
    url, labels, valid = blob_store
    cfg = ClusterConfig(k=6, niter=20, chunk_rows=256, use_gpu="never")
    res = run_kmeans(url, cfg, seed=0)
    assert res.centroids.shape == (6, 16) and res.centroids.dtype == np.float32
    assert res.assignments.dtype == np.int64 and res.distances.dtype == np.float32
    assert (res.assignments[~valid] == -1).all() and np.isnan(res.distances[~valid]).all()
    assert (res.assignments[valid] >= 0).all() and np.isfinite(res.distances[valid]).all()
    assert adjusted_rand_score(labels[valid], res.assignments[valid]) > 0.99
    np.testing.assert_array_equal(res.sizes, np.bincount(res.assignments[valid], minlength=6))
    assert res.sizes.sum() == valid.sum()
    assert 1 <= len(res.inertia_curve) <= 20  # FAISS stops early once the objective is unchanged
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.inertia_curve, res.inertia_curve[1:]))
    # squared L2 to the assigned centroid, recomputed directly
    x = embedding_store.open_embeddings(url)["embeddings"][:].astype(np.float32)
    d = ((x[valid] - res.centroids[res.assignments[valid]]) ** 2).sum(1)
    np.testing.assert_allclose(res.distances[valid], d, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_blobs_recovered_exactly_from_the_greedy_init(tmp_path: Path, seed: int) -> None:
    """60 separated blobs: every one becomes one cluster. FAISS's own k-means++ init merged two
    blobs and split another for each of these seeds (adjusted Rand 0.955, 0.978, 0.984)."""
    x, labels = blobs(6000, 60, 32, seed=0, spread=1.0)
    url = make_store(str(tmp_path / "e.zarr"), x, np.ones(6000, dtype=bool), chunk_rows=1024)
    res = run_kmeans(url, ClusterConfig(k=60, niter=20, use_gpu="never"), seed=seed)
    assert adjusted_rand_score(labels, res.assignments) > 0.999


def _potential(x: np.ndarray, centroids: np.ndarray) -> float:
    d = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
    return float(np.maximum(d, 0).min(1).sum())


def test_greedy_kmeans_plusplus_matches_scikit_learn_in_quality() -> None:
    """Same algorithm as scikit-learn's `kmeans_plusplus` (D² sampling, 2 + ln k trials, the best
    potential kept): over 8 seeds on 40 blobs the initial potentials agree within 15% on average,
    and both are far below uniformly drawn rows, which miss whole blobs."""
    from sklearn.cluster import kmeans_plusplus

    x, _ = blobs(4000, 40, 16, seed=5, spread=1.0)
    ours = np.mean([_potential(x, greedy_kmeans_plusplus(x, 40, s)) for s in range(8)])
    theirs = np.mean([_potential(x, kmeans_plusplus(x, 40, random_state=s)[0]) for s in range(8)])
    uniform = np.mean([_potential(x, x[np.random.default_rng(s).choice(4000, 40, replace=False)]) for s in range(8)])
    assert abs(ours / theirs - 1) < 0.15, (ours, theirs)
    assert ours < uniform / 3, (ours, uniform)


def test_greedy_kmeans_plusplus_picks_distinct_rows_deterministically() -> None:
    x, _ = blobs(300, 5, 8, seed=1)
    c = greedy_kmeans_plusplus(x, 30, seed=4)
    assert c.shape == (30, 8) and c.dtype == np.float32
    rows = [int(np.flatnonzero((x == ci).all(1))[0]) for ci in c]  # every centre is a row of x
    assert len(set(rows)) == 30
    np.testing.assert_array_equal(c, greedy_kmeans_plusplus(x, 30, seed=4))
    assert not np.array_equal(c, greedy_kmeans_plusplus(x, 30, seed=5))
    # k = n takes every row once; duplicated rows (zero potential left) still give k distinct rows
    np.testing.assert_array_equal(np.sort(greedy_kmeans_plusplus(x[:7], 7, 0), axis=0), np.sort(x[:7], axis=0))
    dup = np.repeat(x[:3], 4, axis=0)
    assert len(greedy_kmeans_plusplus(dup, 5, 0)) == 5
    with pytest.raises(ConfigError, match="cluster.k"):
        greedy_kmeans_plusplus(x[:3], 4, 0)


@pytest.mark.numerics
def test_chunked_assignment_equals_one_shot(blob_store: tuple[str, np.ndarray, np.ndarray]) -> None:
    url, _, _ = blob_store
    centroids, _ = fit_kmeans(url, ClusterConfig(k=6, niter=10, use_gpu="never"), seed=3)
    a_small, d_small = assign_clusters(url, centroids, chunk_rows=37, spherical=False)
    a_one, d_one = assign_clusters(url, centroids, chunk_rows=100_000, spherical=False)
    np.testing.assert_array_equal(a_small, a_one)
    np.testing.assert_allclose(d_small, d_one, rtol=1e-4, atol=1e-3, equal_nan=True)


@pytest.mark.numerics
def test_deterministic_for_a_seed(blob_store: tuple[str, np.ndarray, np.ndarray]) -> None:
    url, _, _ = blob_store
    cfg = ClusterConfig(k=6, niter=5, max_points_per_centroid=40, use_gpu="never")  # subsampled training
    c1, curve1 = fit_kmeans(url, cfg, seed=7)
    c2, curve2 = fit_kmeans(url, cfg, seed=7)
    np.testing.assert_array_equal(c1, c2)
    assert curve1 == curve2


def test_restarts_keep_the_lowest_objective(tmp_path: Path) -> None:
    """nredo = 3 includes restart 0 (the nredo = 1 run), so its objective is never higher, and
    it is strictly lower here, where single inits land in different local minima."""
    x, _ = blobs(2000, 25, 8, seed=8, spread=8.0)
    url = make_store(str(tmp_path / "e.zarr"), x, np.ones(2000, dtype=bool), chunk_rows=512)
    objective = {r: fit_kmeans(url, ClusterConfig(k=25, niter=10, nredo=r, use_gpu="never"), seed=0)[1][-1] for r in (1, 3)}
    assert objective[3] < objective[1]


def test_spherical_restarts_keep_the_highest_objective(tmp_path: Path) -> None:
    """Spherical k-means' objective is a sum of cosine similarities: the best restart has the
    highest, as FAISS's own nredo keeps it."""
    x, _ = blobs(2000, 25, 8, seed=8, spread=8.0)
    url = make_store(str(tmp_path / "e.zarr"), x, np.ones(2000, dtype=bool), chunk_rows=512)
    cfg = ClusterConfig(k=25, niter=10, nredo=3, spherical=True, use_gpu="never")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # the training rows: all of them, normalized
    restarts = [_train_faiss(xn, cfg, int(np.random.SeedSequence([0, r]).generate_state(1)[0]), "cpu")[1][-1]
                for r in range(3)]
    assert max(restarts) > min(restarts)  # the restarts differ, so the choice matters
    assert fit_kmeans(url, cfg, seed=0)[1][-1] == pytest.approx(max(restarts), rel=1e-6)


def test_subsampled_training_still_recovers(blob_store: tuple[str, np.ndarray, np.ndarray]) -> None:
    url, labels, valid = blob_store
    res = run_kmeans(url, ClusterConfig(k=6, niter=20, max_points_per_centroid=30, chunk_rows=100, use_gpu="never"), seed=1)
    assert adjusted_rand_score(labels[valid], res.assignments[valid]) > 0.99


def test_spherical(tmp_path: Path) -> None:
    x, labels = blobs(800, 4, 12, seed=4, spread=0.5)
    x *= np.random.default_rng(5).uniform(0.5, 3.0, size=(800, 1)).astype(np.float32)  # norms must not matter
    valid = np.ones(800, dtype=bool)
    url = make_store(str(tmp_path / "emb.zarr"), x, valid)
    res = run_kmeans(url, ClusterConfig(k=4, niter=20, spherical=True, chunk_rows=50, use_gpu="never"), seed=0)
    assert adjusted_rand_score(labels, res.assignments) > 0.99
    assert (res.distances >= -1e-5).all() and (res.distances <= 2 + 1e-5).all()
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-4)


def test_k_larger_than_valid_rows_raises(tmp_path: Path) -> None:
    x, _ = blobs(20, 2, 4, seed=0)
    valid = np.zeros(20, dtype=bool)
    valid[:5] = True
    url = make_store(str(tmp_path / "emb.zarr"), x, valid)
    with pytest.raises(ConfigError, match="cluster.k"):
        fit_kmeans(url, ClusterConfig(k=6, use_gpu="never"), seed=0)


def test_save_and_load(blob_store: tuple[str, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    url, _, _ = blob_store
    res = run_kmeans(url, ClusterConfig(k=6, niter=5, use_gpu="never"), seed=0)
    summary = save_kmeans(res, str(tmp_path / "km"))
    assert summary["k"] == 6 and summary["sizes"] == res.sizes.tolist()
    back = load_kmeans(str(tmp_path / "km"))
    np.testing.assert_array_equal(back.assignments, res.assignments)
    np.testing.assert_array_equal(back.centroids, res.centroids)
    assert back.inertia_curve == res.inertia_curve


def test_assignment_reads_at_most_chunk_rows_of_a_store_larger_than_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory-bounded assignment: every read of the embeddings is at most chunk_rows rows, and
    the traced peak stays far below the store's size (the store is 40× the chunk budget)."""
    import tracemalloc

    import zarr

    n, p, chunk_rows = 8000, 64, 200
    x, _ = blobs(n, 4, p, seed=3)
    url = make_store(str(tmp_path / "big.zarr"), x, np.ones(n, bool), chunk_rows=chunk_rows)
    centroids = x[:4].copy()
    reads: list[int] = []
    original = zarr.Array.__getitem__

    def counting(self, sel):  # type: ignore[no-untyped-def]
        out = original(self, sel)
        if self.ndim == 2:
            reads.append(int(np.shape(out)[0]))
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    tracemalloc.start()
    try:
        assignments, _ = assign_clusters(url, centroids, chunk_rows, spherical=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    store_bytes = n * p * 4
    assert reads and max(reads) <= chunk_rows and sum(reads) == n
    # outputs (n int64 + n float32 = 96 kB) + one chunk (51 kB) + FAISS/zarr overheads; the store is 2 MB
    assert peak < store_bytes / 4, (peak, store_bytes)
    np.testing.assert_array_equal(assignments, assign_clusters(url, centroids, n, spherical=False)[0])


def test_no_cluster_ends_below_the_minimum_size(tmp_path: Path) -> None:
    """Three big blobs and a 2-point outlier pair far away: k = 4 gives the pair its own cluster; with
    min_cluster_size 5 it is dissolved and a big blob split instead, and the artifact says so (the minimum enforced and what was re-seeded)."""
    x, _ = blobs(600, 3, 8, seed=3)
    x = np.concatenate([x, np.full((2, 8), 40.0, np.float32) + np.arange(2)[:, None]]).astype(np.float32)
    url = make_store(str(tmp_path / "e.zarr"), x, np.ones(len(x), bool), dtype="float32")
    plain = run_kmeans(url, ClusterConfig(k=4, niter=20, use_gpu="never", min_cluster_size=0), seed=0)
    assert plain.sizes.min() == 2 and plain.reseeded == []
    res = run_kmeans(url, ClusterConfig(k=4, niter=20, use_gpu="never", min_cluster_size=5), seed=0)
    assert res.sizes.min() >= 5 and res.sizes.sum() == len(x) and len(res.sizes) == 4
    (small,) = np.flatnonzero(plain.sizes == 2)
    assert res.reseeded == [{"cluster": int(small), "size": 2, "split": int(np.argmax(plain.sizes))}]
    # each row's stored distance is to its own (possibly new) centroid
    want = ((x - res.centroids[res.assignments]) ** 2).sum(1)
    np.testing.assert_allclose(res.distances, want, rtol=1e-3, atol=1e-3)
    summary = save_kmeans(res, str(tmp_path / "out"))
    assert summary["min_cluster_size"] == 5 and summary["reseeded"] == res.reseeded
    assert load_kmeans(str(tmp_path / "out")).reseeded == res.reseeded
    assert res.min_cluster_size == 5
    # a minimum the pool cannot hold with room to split is lowered to n // (2k), and reported
    big = run_kmeans(url, ClusterConfig(k=4, niter=5, use_gpu="never", min_cluster_size=400), seed=0)
    assert big.min_cluster_size == 602 // 8 and big.sizes.min() >= 602 // 8

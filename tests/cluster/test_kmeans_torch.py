"""The torch k-means path against FAISS and the numpy init, on the CPU (and on CUDA when present)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from alignet_core.cluster import kmeans_torch
from alignet_core.cluster.kmeans import greedy_kmeans_plusplus, run_kmeans
from alignet_core.config.cluster import ClusterConfig
from alignet_core.hardware import KMeansBackend, faiss_gpu_available, kmeans_backend
from tests.generated_embeddings import blobs, make_store

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _faiss_kmeans(x: np.ndarray, init: np.ndarray, niter: int, spherical: bool) -> faiss.Kmeans:
    km = faiss.Kmeans(x.shape[1], len(init), niter=niter, seed=1, spherical=spherical,
                      max_points_per_centroid=len(x), min_points_per_centroid=1)
    km.train(x, init_centroids=init)
    return km


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spherical", [False, True])
def test_nearest_matches_faiss_flat_index(device: str, spherical: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    c = rng.normal(size=(40, 24)).astype(np.float32)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(24) if spherical else faiss.IndexFlatL2(24)
    index.add(c)
    d_ref, i_ref = index.search(x, 1)
    d, i = kmeans_torch.nearest(torch.from_numpy(x).to(device), torch.from_numpy(c).to(device), spherical)
    np.testing.assert_array_equal(i.cpu().numpy(), i_ref[:, 0])
    np.testing.assert_allclose(d.cpu().numpy(), d_ref[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_init_picks_the_rows_the_numpy_init_picks(device: str) -> None:
    x, _ = blobs(3000, 30, 16, seed=2, spread=1.0)
    for seed in range(4):
        ours = kmeans_torch.greedy_kmeans_plusplus(torch.from_numpy(x).to(device), 30, seed)
        np.testing.assert_array_equal(ours.cpu().numpy(), greedy_kmeans_plusplus(x, 30, seed))
    with pytest.raises(Exception, match="cluster.k"):
        kmeans_torch.greedy_kmeans_plusplus(torch.from_numpy(x[:3]), 4, 0)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spherical", "niter"), [(False, 12), (True, 5)])
def test_lloyd_follows_faiss_iteration_by_iteration(device: str, spherical: bool, niter: int) -> None:
    """L2: both converge, and stop, after 3 of the 12 iterations allowed (the objective repeats).
    Spherical: 5 iterations, all run by both (the cosine objective still rises)."""
    x, _ = blobs(5000, 20, 16, seed=3, spread=2.0)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = greedy_kmeans_plusplus(x, 20, 5)
    km = _faiss_kmeans(x, init, niter, spherical)
    c, curve = kmeans_torch.lloyd(torch.from_numpy(x).to(device), torch.from_numpy(init).to(device), niter, spherical, 0)
    assert len(curve) == len(km.obj) == (3 if not spherical else niter)
    np.testing.assert_allclose(c.cpu().numpy(), km.centroids, atol=1e-4)
    np.testing.assert_allclose(curve, km.obj, rtol=1e-4)


def test_lloyd_refills_empty_clusters_by_splitting() -> None:
    """Two identical initial centroids: one gets every row and the other none; like FAISS,
    the empty one is refilled by splitting a cluster, and ends with rows of its own."""
    x, _ = blobs(2000, 4, 8, seed=6, spread=1.0)
    init = greedy_kmeans_plusplus(x, 4, 0)
    init[3] = init[2]
    c, curve = kmeans_torch.lloyd(torch.from_numpy(x), torch.from_numpy(init), 15, False, 0)
    _, idx = kmeans_torch.nearest(torch.from_numpy(x), c, False)
    assert (np.bincount(idx.numpy(), minlength=4) > 0).all()
    assert curve[-1] < curve[0]
    assert not torch.equal(c[2], c[3])


@pytest.mark.numerics
@pytest.mark.parametrize("spherical", [False, True])
def test_stage_on_torch_agrees_with_the_stage_on_faiss(tmp_path: Path, spherical: bool) -> None:
    x, labels = blobs(1500, 6, 16, seed=0)
    valid = np.random.default_rng(1).random(1500) > 0.05
    url = make_store(str(tmp_path / "emb.zarr"), x, valid, dtype="float16")
    cfg = ClusterConfig(k=6, niter=10, nredo=2, spherical=spherical, chunk_rows=256)
    ref = run_kmeans(url, cfg, seed=3, backend=KMeansBackend("faiss", "cpu"))
    for device in DEVICES:
        res = run_kmeans(url, cfg, seed=3, backend=KMeansBackend("torch", device))
        np.testing.assert_array_equal(res.assignments, ref.assignments)
        assert (res.assignments[~valid] == -1).all() and np.isnan(res.distances[~valid]).all()
        np.testing.assert_allclose(res.distances[valid], ref.distances[valid], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(res.centroids, ref.centroids, atol=1e-4)
        np.testing.assert_allclose(res.inertia_curve, ref.inertia_curve, rtol=1e-4)
        assert adjusted_rand_score(labels[valid], res.assignments[valid]) == 1.0


def test_backend_choice() -> None:
    assert kmeans_backend("never") == KMeansBackend("faiss", "cpu")
    if faiss_gpu_available("auto"):
        expected = KMeansBackend("faiss", "gpu")
    elif torch.cuda.is_available():
        expected = KMeansBackend("torch", "cuda")
    else:
        expected = KMeansBackend("faiss", "cpu")
    assert kmeans_backend("auto") == expected


def test_lloyd_with_as_many_centroids_as_rows() -> None:
    """k = n with two identical initial centroids: the empty one takes half of the other."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    init = x.clone()
    init[5] = init[4]
    c, _ = kmeans_torch.lloyd(x, init, 3, False, 0)
    _, idx = kmeans_torch.nearest(x, c, False)
    assert torch.isfinite(c).all() and len(set(idx.tolist())) >= 5

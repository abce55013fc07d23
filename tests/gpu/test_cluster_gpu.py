"""k-means on a GPU: the torch path (`cluster.kmeans_torch`, what the cluster stage runs where FAISS sees no
GPU) against the CPU: the same initial rows as the numpy init of the FAISS path, the same Lloyd iterations
as torch on the CPU, the same assignments through the stage's store-level code, FAISS's own result when
FAISS is installed; and the backend choice picks the GPU, never silently the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alignet_core.cluster import kmeans_torch
from alignet_core.cluster.kmeans import greedy_kmeans_plusplus, run_kmeans
from alignet_core.config.cluster import ClusterConfig
from alignet_core.hardware import KMeansBackend, faiss_gpu_available, kmeans_backend
from tests.generated_embeddings import blobs, make_store

pytestmark = pytest.mark.gpu


def test_backend_is_the_gpu(device: torch.device) -> None:
    """The cluster stage's default backend (`use_gpu` 'auto') is on the GPU wherever torch sees one, never
    silently the CPU: FAISS's GPUs when it has them, else torch on CUDA. Where torch sees none (a dry run
    on the CPU), FAISS, not torch's k-means on the CPU. 'never' is FAISS on the CPU on every machine."""
    setting = ClusterConfig().use_gpu
    assert setting == "auto"
    if torch.cuda.is_available():  # the GPU machine (the device under test is the CPU only if forced)
        expected = KMeansBackend("faiss", "gpu") if faiss_gpu_available() else KMeansBackend("torch", "cuda")
    else:
        assert device.type == "cpu"  # the fixture skips without a GPU unless the CPU is asked for
        expected = KMeansBackend("faiss", "gpu" if faiss_gpu_available() else "cpu")
    assert kmeans_backend(setting) == expected
    assert kmeans_backend("never") == KMeansBackend("faiss", "cpu")


@pytest.mark.parametrize("spherical", [False, True])
def test_torch_kmeans_on_the_device_matches_the_cpu(device: torch.device, spherical: bool) -> None:
    x, _ = blobs(6000, 24, 32, seed=3, spread=2.0)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    xd, xc = torch.from_numpy(x).to(device), torch.from_numpy(x)
    init = kmeans_torch.greedy_kmeans_plusplus(xd, 24, seed=5)
    assert init.device.type == device.type
    np.testing.assert_array_equal(init.cpu().numpy(), greedy_kmeans_plusplus(x, 24, 5))  # the FAISS path's init rows

    c_dev, curve_dev = kmeans_torch.lloyd(xd, init, 10, spherical, 0)
    c_cpu, curve_cpu = kmeans_torch.lloyd(xc, init.cpu(), 10, spherical, 0)
    assert c_dev.device.type == device.type
    assert len(curve_dev) == len(curve_cpu)
    np.testing.assert_allclose(curve_dev, curve_cpu, rtol=1e-5)
    np.testing.assert_allclose(c_dev.cpu().numpy(), c_cpu.numpy(), atol=1e-4)
    d_dev, i_dev = kmeans_torch.nearest(xd, c_dev, spherical)
    _, i_cpu = kmeans_torch.nearest(xc, c_cpu, spherical)
    assert i_dev.device.type == device.type
    np.testing.assert_array_equal(i_dev.cpu().numpy(), i_cpu.numpy())


def test_cluster_stage_code_on_the_device_assigns_as_on_the_cpu(device: torch.device, tmp_path: Path) -> None:
    """`run_kmeans` (subsample, init, Lloyd, chunked assignment of a store with invalid rows) on the device
    gives the CPU's assignments."""
    x, labels = blobs(4000, 8, 24, seed=0)
    valid = np.random.default_rng(1).random(4000) > 0.05
    url = make_store(str(tmp_path / "emb.zarr"), x, valid, chunk_rows=512, dtype="float16")
    cfg = ClusterConfig(k=8, niter=10, chunk_rows=1000, max_points_per_centroid=300)  # trains on a 2,400-row subsample
    ref = run_kmeans(url, cfg, seed=3, backend=KMeansBackend("torch", "cpu"))
    res = run_kmeans(url, cfg, seed=3, backend=KMeansBackend("torch", device.type))
    np.testing.assert_array_equal(res.assignments, ref.assignments)
    assert (res.assignments[~valid] == -1).all() and np.isnan(res.distances[~valid]).all()
    np.testing.assert_allclose(res.distances[valid], ref.distances[valid], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(res.inertia_curve, ref.inertia_curve, rtol=1e-5)
    # the blobs are recovered: every cluster is one blob
    pairs = {(int(a), int(b)) for a, b in zip(res.assignments[valid], labels[valid])}
    assert len(pairs) == 8


def test_torch_kmeans_on_the_device_matches_faiss(device: torch.device) -> None:
    faiss = pytest.importorskip("faiss", reason="FAISS is not installed (GPU images have none; the torch path runs)")
    x, _ = blobs(5000, 20, 16, seed=3, spread=2.0)
    init = greedy_kmeans_plusplus(x, 20, 5)
    km = faiss.Kmeans(16, 20, niter=12, seed=1, max_points_per_centroid=len(x), min_points_per_centroid=1)
    km.train(x, init_centroids=init)
    c, curve = kmeans_torch.lloyd(torch.from_numpy(x).to(device), torch.from_numpy(init).to(device), 12, False, 0)
    assert len(curve) == len(km.obj)
    np.testing.assert_allclose(c.cpu().numpy(), km.centroids, atol=1e-4)
    np.testing.assert_allclose(curve, km.obj, rtol=1e-4)

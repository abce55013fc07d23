"""The k-means benchmark runs both libraries and the cluster stage on small real data."""

from __future__ import annotations

import pytest

from benchmarks import kmeans


def test_kmeans_benchmark_small() -> None:
    result = kmeans.run(n=3000, p=32, k=10, niter=5)
    assert result["faiss_s"] > 0 and result["sklearn_s"] > 0
    assert result["ratio"] > 0 and result["inertia_faiss"] > 0
    c = result["ceiling"]
    assert c["gemm_gflops"] > 0 and c["faiss_gflops"] > 0 and c["sklearn_gflops"] > 0
    pipe = result["pipeline"]
    assert pipe["ari_ours"] > 0.9 and pipe["ari_sklearn"] > 0.9


def test_ceiling_counts_distance_products() -> None:
    # 2·n·k·p flops per iteration: 10 iterations of 10k rows × 100 dims × 10 centroids in 0.1 s
    # are 2 GFLOP/s; half the iterations in the same time, 1 GFLOP/s
    c = kmeans.ceiling(10_000, 100, 10, faiss=(10, 0.1), sklearn=(5, 0.1))
    assert c["faiss_gflops"] == pytest.approx(2.0)
    assert c["sklearn_gflops"] == pytest.approx(1.0)
    assert c["max_ratio"] == pytest.approx(c["gemm_gflops"], rel=0.01)


def test_gpu_benchmark_code_runs_small_on_the_cpu() -> None:
    """The --gpu benchmark's code (torch k-means at any scale) on a small CPU trial; the GPU
    figure itself comes from a GPU machine (benchmarks/results/gpu/kmeans_gpu.json)."""
    result = kmeans.run_gpu(n=4000, p=16, k=20, niter=5, device="cpu")
    assert result["lloyd_s"]["torch"] > 0 and result["stage_s"] > 0
    first, last = result["objective_first_last"]
    assert last < first
    smallest, largest = result["stage_cluster_sizes_min_max"]
    assert 0 < smallest <= largest < 4000


def test_gpu_benchmark_needs_only_torch_and_numpy() -> None:
    """The GPU machine's image has torch and numpy but no FAISS, Zarr, pydantic or Dask: the
    --gpu benchmark must run there as it is."""
    import subprocess
    import sys

    blocked = ("faiss", "zarr", "pydantic", "prefect", "dask", "distributed", "sklearn", "fsspec", "psutil")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from benchmarks import kmeans\nprint(kmeans.run_gpu(2000, 16, 20, 3, 'cpu')['stage_s'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) > 0

"""FAISS vs scikit-learn k-means on the same data, k, iterations and initial centroids.

    python -m benchmarks.kmeans --quick     # 50k × 256 float32 blobs, k = 100, 20 iterations
    python -m benchmarks.kmeans --gpu       # 1.28M × 1152 on a CUDA GPU, k = 500, 20 iterations

Both run Lloyd iterations from the *same* initial centroids (k rows drawn with a fixed seed),
one init, a fixed number of iterations (sklearn's tol = 0 so it never stops early; FAISS always
runs niter). Times are wall-clock seconds of the fit alone, medians of `repeats` alternating fits;
`ratio` = sklearn / FAISS.
Writes `benchmarks/results/kmeans_quick.json` (or kmeans_full.json) and prints one JSON line.

Equal work makes the two libraries' Lloyd iterations comparable, and on 2 CPU cores both are
bound by the same float32 matrix products. `pipeline` (in the same line) measures what the
cluster stage does instead: `cluster.run_kmeans` on a raw Zarr store (as the transform stage
writes it), which trains on FAISS's subsample of k × 256 rows (greedy k-means++ init included
in its time) and then assigns every row once in chunks, against scikit-learn fitting all rows
(init: k-means++ centroids drawn by scikit-learn from the same number of rows, not timed). Its
shape keeps the paper's rows per cluster (1.28M / 500 = 2,560): 256k × 256, k = 100. Both are
scored on all rows: inertia and adjusted Rand index against the blobs' true labels.
`pipeline.init` times the greedy k-means++ init alone on the training rows: the stage's float32
version (`cluster.greedy_kmeans_plusplus`) against scikit-learn's `kmeans_plusplus`, same rows,
same number of trials.

`ceiling` says how far any implementation could go on this machine: a Lloyd iteration is
bound by its distance products, 2·n·k·p floating-point operations, so each library's rate is
2·n·k·p·iterations / seconds, set beside the float32 matrix-product rate of this machine
measured in the same run (numpy's BLAS on all cores, the best of 5 square 2048³ products).
`max_ratio` = that rate / scikit-learn's: no implementation doing the same iterations could
beat scikit-learn by more.

`--gpu` (`run_gpu`, writes results/gpu/kmeans_gpu.json): the paper's scale, 1.28M × 1152 float32 blobs
around 500 centres made on the GPU, k = 500, 20 iterations. `lloyd_s`: 20 Lloyd iterations on
all rows from k random rows, timed with the GPU synchronized, with FAISS's GPU k-means when
FAISS sees a GPU and with `alignet_core.cluster.kmeans_torch` (the cluster stage's GPU path when FAISS
has none) always. `stage_s`: what the cluster stage computes on that GPU, from rows already in
GPU memory: greedy k-means++ and 20 iterations on the 128k-row training subsample (k × 256),
then the nearest centroid of every row. `--device cpu --n ... --p ...` runs the same code small
on the CPU (how the tests run it).
"""

from __future__ import annotations

import argparse
import os
import time

# FAISS's OpenMP threads spin while waiting by default; on a shared 2-core machine the spinning
# threads fight each other and the other tenants (measured here: 4.5 s with spinning vs 1.0 s
# passive for the same fit). Must be set before the OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from benchmarks._machine import check_gpu_device, machine_info, report_gpu_result, write_result


def _blobs(n: int, p: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, p) float32 Gaussian blobs around k centres, and each row's centre."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, p)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = (centers[labels] + rng.normal(size=(n, p)).astype(np.float32)).astype(np.float32)
    return x, labels


def run_pipeline(n: int, p: int, k: int, niter: int, seed: int = 0) -> dict:
    """The cluster stage's k-means (subsample, then chunked assignment) vs scikit-learn on all rows."""
    import tempfile

    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.metrics import adjusted_rand_score

    from alignet_core.cluster.kmeans import greedy_kmeans_plusplus, run_kmeans
    from alignet_core.config.cluster import ClusterConfig
    from alignet_core.io import embedding_store

    x, labels = _blobs(n, p, k, seed)
    cfg = ClusterConfig(k=k, niter=niter, use_gpu="never")
    with tempfile.TemporaryDirectory(prefix="alignet-kmeans-") as tmp:
        url = os.path.join(tmp, "emb.zarr")
        ids = np.array([f"{i}" for i in range(n)])
        g = embedding_store.create_embedding_store(url, n, p, ids, "float32", 65536, {"benchmark": "kmeans"}, compressed=False)
        g["embeddings"][:] = x
        g["valid"][:] = True
        t0 = time.perf_counter()
        ours = run_kmeans(url, cfg, seed)
        t_ours = time.perf_counter() - t0
    n_train = min(n, k * cfg.max_points_per_centroid)
    sub = x[np.random.default_rng(seed + 2).choice(n, size=n_train, replace=False)]
    t0 = time.perf_counter()
    init, _ = kmeans_plusplus(sub, k, random_state=seed)
    t_sk_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy_kmeans_plusplus(sub, k, seed)
    t_our_init = time.perf_counter() - t0
    sk = KMeans(n_clusters=k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed)
    t0 = time.perf_counter()
    sk.fit(x)
    t_sk = time.perf_counter() - t0
    return {
        "n": n, "p": p, "k": k, "niter": niter, "train_rows_ours": n_train,
        "ours_s": round(t_ours, 3), "sklearn_s": round(t_sk, 3), "ratio": round(t_sk / t_ours, 2),
        "inertia_ours": float(ours.distances.astype(np.float64).sum()), "inertia_sklearn": float(sk.inertia_),
        "ari_ours": round(float(adjusted_rand_score(labels, ours.assignments)), 4),
        "ari_sklearn": round(float(adjusted_rand_score(labels, sk.labels_)), 4),
        "init": {  # greedy k-means++ on the training rows alone: the stage's own vs scikit-learn's
            "rows": n_train, "ours_s": round(t_our_init, 3), "sklearn_s": round(t_sk_init, 3),
            "ratio": round(t_sk_init / t_our_init, 2),
        },
    }


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matrix-product rate in GFLOP/s: best of `repeats` square products."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up: BLAS threads start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def ceiling(n: int, p: int, k: int, faiss: tuple[int, float], sklearn: tuple[int, float]) -> dict:
    """GFLOP/s of each library's Lloyd iterations ((iterations, seconds) each) against this
    machine's matrix-product rate, and the largest ratio that rate allows over scikit-learn."""
    peak = gemm_gflops()
    rate = {name: 2 * n * k * p * it / s / 1e9 for name, (it, s) in (("faiss", faiss), ("sklearn", sklearn))}
    return {"gemm_gflops": round(peak, 1), "faiss_gflops": round(rate["faiss"], 1),
            "sklearn_gflops": round(rate["sklearn"], 1), "max_ratio": round(peak / rate["sklearn"], 2)}


def run(n: int, p: int, k: int, niter: int, seed: int = 0, repeats: int = 3) -> dict:
    import faiss
    import sklearn
    from sklearn.cluster import KMeans

    x, _ = _blobs(n, p, k, seed)
    init = x[np.random.default_rng(seed + 1).choice(n, size=k, replace=False)].copy()
    threads = faiss.omp_get_max_threads()

    faiss_runs, sk_runs = [], []
    for _ in range(repeats):  # alternating, so a slow phase of the shared host hits both
        km = faiss.Kmeans(p, k, niter=niter, nredo=1, seed=seed, verbose=False,
                          max_points_per_centroid=n, min_points_per_centroid=1)
        t0 = time.perf_counter()
        km.train(x, init_centroids=init)
        faiss_runs.append(time.perf_counter() - t0)
        sk = KMeans(n_clusters=k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed)
        t0 = time.perf_counter()
        sk.fit(x)
        sk_runs.append(time.perf_counter() - t0)
    t_faiss, t_sk = float(np.median(faiss_runs)), float(np.median(sk_runs))
    _, a_faiss = km.index.search(x, 1)
    inertia_faiss = float(((x - km.centroids[a_faiss[:, 0]]) ** 2).sum())

    return {
        "benchmark": "kmeans",
        "n": n, "p": p, "k": k, "niter": niter, "n_init": 1, "init": "same k random rows for both",
        "faiss_s": round(t_faiss, 3),
        "sklearn_s": round(t_sk, 3),
        "ratio": round(t_sk / t_faiss, 2),
        "target_ratio": 10,
        "repeats": repeats,
        "runs_faiss_s": [round(t, 3) for t in faiss_runs],
        "runs_sklearn_s": [round(t, 3) for t in sk_runs],
        "sklearn_iterations": int(sk.n_iter_),
        "inertia_faiss": inertia_faiss,
        "inertia_sklearn": float(sk.inertia_),
        "faiss_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "sklearn": sklearn.__version__,
        "ceiling": ceiling(n, p, k, (niter, t_faiss), (int(sk.n_iter_), t_sk)),
        "pipeline": run_pipeline(max(n, 2560 * k), p, k, niter, seed),
        "machine": machine_info(),
    }


#: seconds for 20 Lloyd iterations of 1.28M × 1152 rows, k = 500, on one GPU (the GPU target for regenerating an ImageNet-scale dataset)
TARGET_LLOYD_S = 5.0


def run_gpu(n: int, p: int, k: int, niter: int, device: str = "cuda", seed: int = 0) -> dict:
    """The paper-scale k-means on a GPU: see the module doc."""
    import torch

    from alignet_core.cluster import kmeans_torch
    try:  # not hardware.faiss_gpu_available: the GPU machine may have neither FAISS nor pydantic
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        faiss_gpus = 0

    def timed(fn):  # (result, seconds) with the device synchronized around fn
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn((k, p), generator=g, device=device) * 4.0
    labels = torch.randint(0, k, (n,), generator=g, device=device)
    x = centres[labels] + torch.randn((n, p), generator=g, device=device)
    del centres
    init = x[torch.randperm(n, generator=g, device=device)[:k]].clone()
    kmeans_torch.lloyd(x[: 4 * k], init, 1, False, seed)  # warm-up: kernels load, cuBLAS picks its algorithms
    (_, curve), t_lloyd = timed(lambda: kmeans_torch.lloyd(x, init, niter, False, seed, stop_when_converged=False))
    result: dict = {
        "benchmark": "kmeans_gpu", "n": n, "p": p, "k": k, "niter": niter, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "lloyd_s": {"torch": round(t_lloyd, 3)},
        "target_lloyd_s": TARGET_LLOYD_S,  # the paper's scale (1.28M × 1152, k = 500, 20 iterations)
        "meets_target": t_lloyd <= TARGET_LLOYD_S,
        "lloyd_tflops": {"torch": round(2 * n * k * p * len(curve) / t_lloyd / 1e12, 2)},
        "objective_first_last": [curve[0], curve[-1]],
    }
    if faiss_gpus:
        xh, ih = x.cpu().numpy(), init.cpu().numpy()
        km = faiss.Kmeans(p, k, niter=niter, gpu=True, max_points_per_centroid=n, min_points_per_centroid=1)
        _, t_faiss = timed(lambda: km.train(xh, init_centroids=ih))
        result["lloyd_s"]["faiss"] = round(t_faiss, 3)
    n_train = min(n, 256 * k)
    sub = x[torch.randperm(n, generator=g, device=device)[:n_train]].contiguous()

    def stage() -> torch.Tensor:
        c0 = kmeans_torch.greedy_kmeans_plusplus(sub, k, seed)
        c, _ = kmeans_torch.lloyd(sub, c0, niter, False, seed)
        return kmeans_torch.nearest(x, c, False)[1]

    assignments, t_stage = timed(stage)
    result["stage_s"] = round(t_stage, 3)
    result["stage_train_rows"] = n_train
    result["stage_cluster_sizes_min_max"] = [int(v) for v in torch.bincount(assignments, minlength=k).aminmax()]
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["machine"] = machine_info()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="50k × 256, k = 100, 20 iterations (default)")
    mode.add_argument("--full", action="store_true", help="500k × 256, k = 500, 20 iterations")
    mode.add_argument("--gpu", action="store_true", help="1.28M × 1152, k = 500, 20 iterations on a GPU")
    ap.add_argument("--device", default="cuda", help="--gpu: the torch device (cpu for a small trial run)")
    ap.add_argument("--n", type=int, default=1_280_000, help="--gpu: rows")
    ap.add_argument("--p", type=int, default=1152, help="--gpu: dimensions")
    ap.add_argument("--k", type=int, default=500, help="--gpu: clusters")
    ap.add_argument("--niter", type=int, default=20, help="--gpu: Lloyd iterations")
    args = ap.parse_args(argv)
    if args.gpu:
        check_gpu_device(ap, args.device, "--gpu --device cpu --n 4000 --p 16 --k 20")
        report_gpu_result("kmeans_gpu", run_gpu(args.n, args.p, args.k, args.niter, args.device), args.device)
    elif args.full:  # pipeline part: 1.28M × 256, k = 500
        write_result("kmeans_full", run(500_000, 256, 500, 20))
    else:
        write_result("kmeans_quick", run(50_000, 256, 100, 20))


if __name__ == "__main__":
    main()

"""Distributed triplet sampling with teacher similarities, on a real Dask LocalCluster.

    python -m benchmarks.sampling --quick   # 100k × 256 store, 1M triplets
    python -m benchmarks.sampling --full    # 1M × 768 float16 store, 500 clusters, 10M triplets

Setup (not timed): a float16 Zarr embedding store made with `embedding_store.create_embedding_store`
(Gaussian blobs around `k` centres, so the clusters are real) and a groups file of cluster ids.
Then the real shard code (`sample.shards.run_shard`: sampling, chunk-aligned gathering of the rows
from Zarr, dot products, odd-one-out order, atomic npz write) runs for every shard of
`cluster_border` triplets on a `distributed.LocalCluster` of 1 worker and then of 2 workers
(processes, 1 thread each), each with a fresh output folder. `wall_s` is the 2-worker time from
submitting the shards to the last result (cluster start-up excluded, reported separately);
`peak_rss_gib` is the peak over time of the summed RSS of this process (client, scheduler and
nannies) and all its child processes (the workers), sampled every 200 ms, and `peak_pss_gib`
the same for PSS (shared pages counted once), sampled every second since reading it costs CPU
the workers need (see `PeakRSS`). The workers run with the
pipeline's `flows.dask_workers.SamplingWorkerSetup` plugin (malloc settings; torch imported at
start-up, so inside `startup_s`) and `WORKER_CONFIG`, as the sample flow's local cluster does;
`peak_cgroup_gib` is the peak of the memory the kernel charged to the whole run, page cache
included, with every page counted once (see `benchmarks/_cgroup.py`; the benchmark joins a
child memory cgroup where it may, and reports null where not): the store's pages, which both
workers memory-map, count once in it and in PSS but twice in summed RSS.
`efficiency_1_to_2` = t1 / (2 · t2). The load average before the run is in `machine`, since
other processes may share the cores. This machine's speed drifts by up to ~1.5× over minutes
(other tenants of the host), so `--repeats N` alternates N 1-worker and N 2-worker runs and
reports each size's median run (every run is listed in `runs`; peaks are the maxima).

`row_paths` times one shard's teacher similarities in this process, alternating `repeats` times
between the two ways rows reach the dot products: gathered from the memory-mapped store (what
shards do on a raw local store, `embedding_store.RawChunkReader.map_rows`) and copied out chunk by chunk
first (`sample.teacher.copied_row_similarities`, the path for compressed or remote stores); `ratio` = copied /
mapped, medians. Both give the same similarities, bit for bit (checked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from benchmarks._cgroup import MemoryCgroup
from benchmarks._machine import machine_info, write_result

MODES = {
    "quick": {"n": 100_000, "p": 256, "k": 100, "n_triplets": 1_000_000, "shard_size": 250_000, "chunk_rows": 8192},
    "full": {"n": 1_000_000, "p": 768, "k": 500, "n_triplets": 10_000_000, "shard_size": 500_000, "chunk_rows": 8192},
}


class PeakRSS:
    """Peaks of the summed RSS and the summed PSS of this process and all its descendants,
    sampled in a thread.

    Summed RSS counts every shared page (torch's and numpy's libraries, mapped by each worker)
    once per process; PSS charges a shared page in equal parts to the processes mapping it.
    RSS is a counter the kernel keeps (`/proc/PID/statm`, ~0.02 ms a read) and is sampled every
    `interval` seconds. PSS is computed on each read by walking the process's page tables
    (`/proc/PID/smaps_rollup`): ~13 ms for a process that has imported torch, 18–28 ms for one
    sample of the 2-worker run with the store mapped. At every 200 ms that was ~10% of a core,
    taken from the workers in the 2-worker run only (the 1-worker run leaves a core idle for it),
    so PSS is sampled every `pss_interval` seconds instead; a shard holds its rows for seconds.
    """

    def __init__(self, interval: float = 0.2, pss_interval: float = 1.0) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._pss_every = max(1, round(pss_interval / interval))
        self._stop = threading.Event()
        self.peak = 0
        self.peak_pss = 0
        self._cpu: dict[int, float] = {}  # pid -> user + system seconds, last seen
        self._cpu0 = sum(self._proc.cpu_times()[:2])
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, with_pss: bool) -> tuple[int, int]:
        rss = pss = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                if with_pss:
                    pss += p.memory_full_info().pss
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system
            except Exception:  # a child that just exited
                pass
        return rss, pss

    @property
    def cpu_s(self) -> float:
        """CPU seconds used by this process (since start) and its children while sampled."""
        own = self._cpu.get(self._proc.pid, self._cpu0) - self._cpu0
        return own + sum(v for pid, v in self._cpu.items() if pid != self._proc.pid)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self._update(with_pss=tick % self._pss_every == 0)
            tick += 1
            self._stop.wait(self._interval)

    def _update(self, with_pss: bool) -> None:
        rss, pss = self._sample(with_pss)
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update(with_pss=True)


def make_store(root: str, n: int, p: int, k: int, chunk_rows: int, seed: int = 0, compressed: bool = False) -> tuple[str, str]:
    """A float16 store of n × p blob embeddings (k centres) and its (n,) cluster-id groups file.

    Made by `embedding_store.create_embedding_store` as the transform stage makes its store: raw by
    default (`compressed=False`, see `benchmarks/store_read.py`); `compressed=True` uses Zarr's
    default zstd codec instead, as the extraction stage does.
    """
    from alignet_core.io import embedding_store
    url = os.path.join(root, "emb.zarr")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, p)).astype(np.float32) / np.sqrt(p)
    labels = rng.integers(0, k, n)
    ids = np.array([f"img/{i:07d}.jpg" for i in range(n)])
    g = embedding_store.create_embedding_store(url, n, p, ids, "float16", chunk_rows, {"benchmark": "sampling"}, compressed=compressed)
    for lo in range(0, n, 65536):
        hi = min(lo + 65536, n)
        x = centres[labels[lo:hi]] + 0.5 * rng.normal(size=(hi - lo, p)).astype(np.float32) / np.sqrt(p)
        g["embeddings"][lo:hi] = x.astype(np.float16)
    g["valid"][:] = True
    groups = os.path.join(root, "groups.npy")
    np.save(groups, labels.astype(np.int64))
    return url, groups


def run_on_cluster(n_workers: int, specs: list, groups: str, store_url: str, out_dir: str,
                   cgroup: MemoryCgroup | None = None) -> dict:
    from distributed import Client, LocalCluster

    from alignet_core.sample.shards import run_shard
    from flows.dask_workers import WORKER_CONFIG, SamplingWorkerSetup

    if cgroup is not None:
        cgroup.reset_peak()
    t0 = time.perf_counter()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                      plugins=(SamplingWorkerSetup(),), config=WORKER_CONFIG) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        startup = time.perf_counter() - t0
        with PeakRSS() as rss:
            t1 = time.perf_counter()
            futures = client.map(run_shard, specs, groups_url=groups, store_url=store_url, out_dir=out_dir, pure=False)
            paths = client.gather(futures)
            wall = time.perf_counter() - t1
        peak_cgroup = cgroup.peak_bytes() if cgroup is not None else None
    n_out = 0
    for path in paths:
        with np.load(path) as z:
            n_out += len(z["indices"])
    return {"workers": n_workers, "wall_s": round(wall, 2), "startup_s": round(startup, 2),
            "peak_rss_gib": round(rss.peak / 2**30, 3), "peak_pss_gib": round(rss.peak_pss / 2**30, 3),
            "peak_cgroup_gib": round(peak_cgroup / 2**30, 3) if peak_cgroup is not None else None, "cpu_s": round(rss.cpu_s, 1),
            "n_triplets_written": n_out}


def time_row_paths(store_url: str, groups_url: str, spec: object, repeats: int) -> dict:
    """Median seconds of one shard's similarities from the memory map vs from copied rows."""
    from alignet_core.io import embedding_store
    from alignet_core.sample.strategies import sample_shard
    from alignet_core.sample.teacher import copied_row_similarities, teacher_similarities

    emb = embedding_store.open_embeddings(store_url)["embeddings"]
    triplets = sample_shard(spec.strategy, np.load(groups_url), spec.n, spec.seed, spec.index)
    if embedding_store.RawChunkReader.for_array(emb) is None:
        return {"mapped": False}
    teacher_similarities(triplets[:1000], emb)  # untimed: imports torch, first touch of the maps
    mapped, copied = [], []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        a = teacher_similarities(triplets, emb)
        mapped.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = copied_row_similarities(triplets, emb, emb.dtype)
        copied.append(time.perf_counter() - t0)
        if not np.array_equal(a, b):
            raise AssertionError("memory-mapped and copied rows gave different similarities")
    m, c = float(np.median(mapped)), float(np.median(copied))
    return {"mapped": True, "triplets": len(triplets), "mapped_s": round(m, 3), "copied_s": round(c, 3),
            "ratio": round(c / m, 2), "runs_mapped_s": [round(x, 3) for x in mapped], "runs_copied_s": [round(x, 3) for x in copied]}


def run(mode: str, workdir: str | None = None, compressed: bool = False, repeats: int = 1) -> dict:
    from alignet_core.sample.shards import plan_shards

    m = MODES[mode]
    machine = machine_info()  # load average before anything runs
    cgroup = MemoryCgroup.join("alignet-bench")  # before the store is made: its page cache is charged here
    root = tempfile.mkdtemp(prefix="alignet-bench-", dir=workdir)
    try:
        t0 = time.perf_counter()
        store_url, groups = make_store(root, m["n"], m["p"], m["k"], m["chunk_rows"], compressed=compressed)
        setup = time.perf_counter() - t0
        specs = [s for s in plan_shards(["cluster_border"], m["n_triplets"], 1, m["shard_size"], seed=0) if s.split == "train"]
        all_runs: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(repeats):  # alternating, so a slow phase of the host hits both sizes
            for workers in (1, 2):
                out = os.path.join(root, f"out-{workers}-{r}")
                all_runs[workers].append(run_on_cluster(workers, specs, groups, store_url, out, cgroup))
                shutil.rmtree(out, ignore_errors=True)
        # after the cluster runs: it imports torch into this process, whose RSS those runs count
        row_paths = time_row_paths(store_url, groups, specs[0], repeats)
        # the run of median wall time for each size (the later one of the middle two if even)
        runs = {w: sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2] for w, rs in all_runs.items()}
        t1, t2 = runs[1]["wall_s"], runs[2]["wall_s"]
        result = {
            "benchmark": f"sampling_{mode}",
            "n_images": m["n"], "dim": m["p"], "dtype": "float16", "clusters": m["k"],
            "n_triplets": m["n_triplets"], "strategy": "cluster_border", "shard_size": m["shard_size"],
            "n_shards": len(specs), "chunk_rows": m["chunk_rows"],
            "store_compressor": "zarr default (zstd)" if compressed else None,
            "repeats": repeats,
            "wall_s": t2,
            "peak_rss_gib": max(x["peak_rss_gib"] for x in all_runs[2]),
            "peak_pss_gib": max(x["peak_pss_gib"] for x in all_runs[2]),
            "peak_cgroup_gib": max(x["peak_cgroup_gib"] for x in all_runs[2]) if cgroup is not None else None,
            "efficiency_1_to_2": round(t1 / (2 * t2), 3),
            # CPU seconds of all processes per run: contention from other tenants inflates wall
            # time but much less the CPU time, so this ratio shows the parallel overhead alone
            "cpu_efficiency_1_to_2": round(runs[1]["cpu_s"] / runs[2]["cpu_s"], 3) if runs[2]["cpu_s"] else None,
            "targets": {"wall_s": 60, "peak_memory_gib": 4, "efficiency_1_to_2": 0.8} if mode == "full" else None,
            "runs": [x for r in range(repeats) for x in (all_runs[1][r], all_runs[2][r])],
            "row_paths": row_paths,
            "setup_s": round(setup, 1),
            "machine": machine,
            "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        }
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if cgroup is not None:
            cgroup.leave()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="100k × 256 store, 1M triplets (default)")
    mode.add_argument("--full", action="store_true", help="1M × 768 float16 store, 500 clusters, 10M triplets")
    ap.add_argument("--workdir", default=None, help="folder for the temporary store (default: system temp)")
    ap.add_argument("--compressed", action="store_true", help="store with Zarr's default codec (slower reads)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternating 1- and 2-worker runs; times are each size's median run, memory the max")
    args = ap.parse_args(argv)
    name = "full" if args.full else "quick"
    write_result(f"sampling_{name}", run(name, args.workdir, args.compressed, args.repeats))


if __name__ == "__main__":
    main()

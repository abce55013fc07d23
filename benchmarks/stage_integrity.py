"""What recording and checking a stage's files costs: sha256 at `finish`, a size check at each reuse.

    python -m benchmarks.stage_integrity                   # a 1M-image run's stage files
    python -m benchmarks.stage_integrity --rows 100000 --triplets 1000000   # a tenth of it

Three stage directories of the sizes a run of `--rows` images writes, each by the project's own writers:
- `transform`: the (n, 768) float32 store, raw (as the transform stage writes it), `transform.chunk_rows`
  rows per chunk file (`embedding_store.create_embedding_store`);
- `cluster`: `assignments` (n,) int64, `distances` (n,) float32, `centroids` (k, 768), `sizes`
  (`store.write_npy`, as `save_kmeans`);
- `sample`: `--triplets` triplets in shards of 1M (`indices` (m, 3) int64, `similarities` (m, 3) float32,
  the sampling stage's `.npz` shards).

For each: `write_s` (writing the files, from arrays already in memory, flushed to the page cache as the
stages leave them), `hash_s` (`store.stage_files`: every file's size and sha256, what `finish` now adds),
`size_check_s` (`store.stage_file_problems` without checksums: one listing, what every reuse now adds),
`verify_s` (with checksums: what `alignet verify --stages` pays), and each as a fraction of `write_s`.
The files are in the page cache when hashed (as at `finish`, right after the stage wrote them); a cold
read for `verify` adds the disk's read time. Times are the median of `--repeats` passes.
Writes `benchmarks/results/stage_integrity.json` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._machine import machine_info, write_result

SHARD = 1_000_000  # triplets per sampling shard written here


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(f"{float(np.median(times)):.4g}")


def write_transform(d: str, n: int, dim: int, chunk_rows: int) -> None:
    """The transform stage's raw (n, dim) float32 store, written chunk by chunk as the stage does."""
    from alignet_core.io import embedding_store

    g = embedding_store.create_embedding_store(os.path.join(d, "transformed.zarr"), n, dim,
                                               np.array([f"img{i:07d}" for i in range(n)]), "float32", chunk_rows,
                                               {}, compressed=False)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((chunk_rows, dim), dtype=np.float32)  # one block, reused: writing is timed, not RNG
    emb = g["embeddings"]
    for lo in range(0, n, chunk_rows):
        emb[lo:lo + chunk_rows] = block[: min(chunk_rows, n - lo)]
    g["valid"][:] = np.ones(n, dtype=bool)


def write_cluster(d: str, n: int, dim: int, k: int) -> None:
    """The cluster stage's arrays, as `save_kmeans` writes them."""
    from alignet_core.io import store

    rng = np.random.default_rng(1)
    store.write_npy(os.path.join(d, "assignments.npy"), rng.integers(0, k, n, dtype=np.int64))
    store.write_npy(os.path.join(d, "distances.npy"), rng.random(n, dtype=np.float32))
    store.write_npy(os.path.join(d, "centroids.npy"), rng.standard_normal((k, dim), dtype=np.float32))
    store.write_npy(os.path.join(d, "sizes.npy"), np.bincount(rng.integers(0, k, n), minlength=k))


def write_sample(d: str, n: int, triplets: int) -> None:
    """`triplets` sampled triplets in `.npz` shards of `SHARD`, as the sampling stage writes its shards."""
    from alignet_core.sample.shards import _write_npz_atomic

    os.makedirs(os.path.join(d, "shards"), exist_ok=True)
    rng = np.random.default_rng(2)
    m = min(SHARD, triplets)
    idx = rng.integers(0, n, (m, 3), dtype=np.int64)
    sims = np.sort(rng.random((m, 3), dtype=np.float32), axis=1)[:, ::-1]
    for i, lo in enumerate(range(0, triplets, SHARD)):
        rows = min(SHARD, triplets - lo)
        _write_npz_atomic(os.path.join(d, "shards", f"train-{i:05d}.npz"), indices=idx[:rows],
                          similarities=sims[:rows], n_requested=np.int64(rows), n_ties=np.int64(0))


def measure(name: str, write: Callable[[str], None], root: str, repeats: int) -> dict[str, Any]:
    """Write one stage directory, then time hashing it, checking its sizes and re-hashing it against the record."""
    from alignet_core.io import store

    d = os.path.join(root, name)
    os.makedirs(d)
    t0 = time.perf_counter()
    write(d)
    write_s = time.perf_counter() - t0
    files = store.stage_files(d)
    hash_s = _median_s(lambda: store.stage_files(d), repeats)
    size_check_s = _median_s(lambda: store.stage_file_problems(d, files, checksums=False), max(repeats, 5))
    verify_s = _median_s(lambda: store.stage_file_problems(d, files, checksums=True), repeats)
    assert not store.stage_file_problems(d, files, checksums=True)
    size = sum(f["size"] for f in files.values())
    store.remove(d)
    return {"stage": name, "files": len(files), "mib": round(size / 2**20, 1), "write_s": float(f"{write_s:.4g}"),
            "hash_s": hash_s, "size_check_s": size_check_s, "verify_s": verify_s,
            "hash_over_write": round(hash_s / write_s, 3), "size_check_over_write": round(size_check_s / write_s, 5),
            "hash_mib_per_s": round(size / 2**20 / hash_s)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="images of the run")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--triplets", type=int, default=10_000_000, help="triplets in the sampling stage's shards")
    ap.add_argument("--k", type=int, default=500, help="clusters")
    ap.add_argument("--chunk-rows", type=int, default=4096, help="transform.chunk_rows default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None, help="folder to write in (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print the result, do not write the JSON file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alignet-stage-integrity-", dir=args.root) as root:
        cases = [measure("transform", lambda d: write_transform(d, args.rows, args.dim, args.chunk_rows), root,
                         args.repeats),
                 measure("cluster", lambda d: write_cluster(d, args.rows, args.dim, args.k), root, args.repeats),
                 measure("sample", lambda d: write_sample(d, args.rows, args.triplets), root, args.repeats)]
        filesystem = _filesystem(root)
    total = {k: float(f"{sum(c[k] for c in cases):.4g}") for k in ("write_s", "hash_s", "size_check_s", "verify_s")}
    result = {"benchmark": "stage_integrity", "rows": args.rows, "dim": args.dim, "triplets": args.triplets,
              "k": args.k, "chunk_rows": args.chunk_rows, "repeats": args.repeats, "cases": cases,
              "total": {**total, "hash_over_write": round(total["hash_s"] / total["write_s"], 3),
                        "size_check_over_write": round(total["size_check_s"] / total["write_s"], 5)},
              "page_cache": "files hashed right after they were written (in the page cache), as at finish",
              "filesystem": filesystem, "machine": machine_info()}
    if args.no_write:
        print(json.dumps(result, indent=2))
    else:
        write_result("stage_integrity", result)
    return result


def _filesystem(path: str) -> str | None:
    """The file system type the files were written to (from /proc/mounts), or None."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best = max((m for m in mounts if os.path.realpath(path).startswith(m[1].rstrip("/") + "/") or m[1] == "/"),
               key=lambda m: len(m[1]), default=None)
    return best[2] if best else None


if __name__ == "__main__":
    main()

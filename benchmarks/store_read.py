"""Raw vs zstd-compressed embedding stores: bytes on disk and the time of a chunk-by-chunk read.

    python -m benchmarks.store_read      # 200k × 768, float16 and float32, dense and ReLU'd features

Clustering reads the transformed store whole (training sample, then assignment) and every
sampling shard reads nearly all of its chunks, so a store's read speed is paid many times.
Both stores are made by `embedding_store.create_embedding_store` (`compressed=True`: Zarr's default zstd;
`compressed=False`: raw), with the pipeline's chunking, from the same rows. "dense" rows are
Gaussian, like the transformed (affine) embeddings; "relu" rows have their negative entries set
to zero, like pooled CNN features, which is where compression pays. Times are medians of 5
passes over the whole store chunk by chunk (files in the page cache), as clustering's assignment
and a sampling shard read it: `raw_read_s` and `zstd_read_s` through Zarr (`embeddings[lo:hi]`),
`raw_chunk_reader_s` with `embedding_store.RawChunkReader` (one `readinto` per chunk into a reused buffer),
the path `io.embedding_store.gather_rows` takes on raw local stores. `read_ratio` = zstd / raw through Zarr.
Writes `benchmarks/results/store_read.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._machine import machine_info, write_result


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _median_chunk_pass_s(url: str, raw_reader: bool, repeats: int = 5) -> float:
    """A pass over the store chunk by chunk, as `io.embedding_store.gather_rows` reads it: with
    `embedding_store.RawChunkReader` into one reused buffer, or with Zarr (`embeddings[lo:hi]`)."""
    from alignet_core.io import embedding_store
    emb = embedding_store.open_embeddings(url)["embeddings"]
    n, rows = emb.shape[0], int(emb.chunks[0])
    reader = embedding_store.RawChunkReader.for_array(emb) if raw_reader else None
    buf = np.empty((rows, emb.shape[1]), dtype=emb.dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c, lo in enumerate(range(0, n, rows)):
            if reader is not None:
                reader.read(c, buf)
            else:
                emb[lo : lo + rows]
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(n: int, p: int, dtype: str, kind: str, chunk_rows: int, root: str) -> dict:
    from alignet_core.io import embedding_store, store
    x = np.random.default_rng(0).standard_normal((n, p), dtype=np.float32)
    if kind == "relu":
        np.maximum(x, 0, out=x)
    x = x.astype(dtype)
    ids = np.array([f"{i}" for i in range(n)])
    row: dict = {"dtype": dtype, "rows": kind}
    for compressed in (False, True):
        url = os.path.join(root, f"{dtype}-{kind}-{compressed}.zarr")
        g = embedding_store.create_embedding_store(url, n, p, ids, dtype, chunk_rows, {}, compressed=compressed)
        g["embeddings"][:] = x
        name = "zstd" if compressed else "raw"
        row[f"{name}_mib"] = round(_dir_bytes(os.path.join(url, "embeddings")) / 2**20, 1)
        row[f"{name}_read_s"] = round(_median_chunk_pass_s(url, raw_reader=False), 3)
        if not compressed:
            row["raw_chunk_reader_s"] = round(_median_chunk_pass_s(url, raw_reader=True), 3)
        store.remove(url)
    row["size_saved"] = round(1 - row["zstd_mib"] / row["raw_mib"], 3)
    row["read_ratio"] = round(row["zstd_read_s"] / row["raw_read_s"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk-rows", type=int, default=4096, help="transform.chunk_rows default")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alignet-store-read-") as root:
        cases = [measure(args.rows, args.dim, dtype, kind, args.chunk_rows, root)
                 for dtype in ("float16", "float32") for kind in ("dense", "relu")]
    write_result("store_read", {
        "benchmark": "store_read", "n": args.rows, "p": args.dim, "chunk_rows": args.chunk_rows,
        "cases": cases, "machine": machine_info(),
    })


if __name__ == "__main__":
    main()

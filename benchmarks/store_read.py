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
Times are rounded to 4 significant digits. Each way of reading also says what it read: `rows_read`, the
fewest rows any timed pass read (a chunk `RawChunkReader` has no full file for counts none), and
`digest_read`, a BLAKE2b digest of the rows an untimed pass of the same code read, in order, to compare
with `digest_written`, that of the rows written.
Writes `benchmarks/results/store_read.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._machine import machine_info, write_result


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _chunk_pass(emb: Any, reader: Any, buf: np.ndarray, digest: Any = None) -> int:
    """One pass over the store chunk by chunk, as `io.embedding_store.gather_rows` reads it: with
    `embedding_store.RawChunkReader` into one reused buffer (`reader`), or with Zarr (`embeddings[lo:hi]`).
    Returns the rows read; with `digest` (a hashlib object), feeds it those rows in order."""
    n, rows = emb.shape[0], buf.shape[0]
    read = 0
    for c, lo in enumerate(range(0, n, rows)):
        if reader is not None:
            if not reader.read(c, buf):
                continue
            got = buf[: min(rows, n - lo)]
        else:
            got = emb[lo : lo + rows]
        read += len(got)
        if digest is not None:
            digest.update(np.ascontiguousarray(got))
    return read


def _measure_chunk_passes(url: str, raw_reader: bool, repeats: int = 5) -> dict:
    """The median time of `repeats` timed passes over the store (`_chunk_pass`), the fewest rows a timed
    pass read, and the digest of the rows that one more, untimed, pass of the same code read."""
    from alignet_core.io import embedding_store
    emb = embedding_store.open_embeddings(url)["embeddings"]
    reader = embedding_store.RawChunkReader.for_array(emb) if raw_reader else None
    if raw_reader and reader is None:
        raise RuntimeError(f"{url}: RawChunkReader cannot read this store (not raw, local, row-chunked)")
    buf = np.empty((int(emb.chunks[0]), emb.shape[1]), dtype=emb.dtype)
    times, rows_read = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows_read.append(_chunk_pass(emb, reader, buf))
        times.append(time.perf_counter() - t0)
    digest = _digest()
    _chunk_pass(emb, reader, buf, digest)
    return {"s": float(np.median(times)), "rows_read": min(rows_read), "digest": digest.hexdigest()}


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


def _seconds(s: float) -> float:
    """Seconds to 4 significant digits: a fast pass over a small store stays above 0."""
    return float(f"{s:.4g}")


def make_rows(n: int, p: int, dtype: str, kind: str) -> np.ndarray:
    """The rows `measure` writes: Gaussian ("dense"), or with the negative entries set to zero ("relu")."""
    x = np.random.default_rng(0).standard_normal((n, p), dtype=np.float32)
    if kind == "relu":
        np.maximum(x, 0, out=x)
    return x.astype(dtype)


def measure(n: int, p: int, dtype: str, kind: str, chunk_rows: int, root: str) -> dict:
    from alignet_core.io import embedding_store, store
    x = make_rows(n, p, dtype, kind)
    ids = np.array([f"{i}" for i in range(n)])
    written = _digest()
    written.update(np.ascontiguousarray(x))
    row: dict = {"dtype": dtype, "rows": kind}
    rows_read, digest_read = {}, {}
    for compressed in (False, True):
        url = os.path.join(root, f"{dtype}-{kind}-{compressed}.zarr")
        g = embedding_store.create_embedding_store(url, n, p, ids, dtype, chunk_rows, {}, compressed=compressed)
        g["embeddings"][:] = x
        name = "zstd" if compressed else "raw"
        row[f"{name}_mib"] = round(_dir_bytes(os.path.join(url, "embeddings")) / 2**20, 1)
        ways = [(name, False)] + ([("raw_chunk_reader", True)] if not compressed else [])
        for way, raw_reader in ways:
            m = _measure_chunk_passes(url, raw_reader)
            row[f"{way}_s" if raw_reader else f"{way}_read_s"] = _seconds(m["s"])
            rows_read[way], digest_read[way] = m["rows_read"], m["digest"]
        store.remove(url)
    row["size_saved"] = round(1 - row["zstd_mib"] / row["raw_mib"], 3)
    row["read_ratio"] = round(row["zstd_read_s"] / row["raw_read_s"], 2)
    row.update(rows_read=rows_read, digest_read=digest_read, digest_written=written.hexdigest())
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

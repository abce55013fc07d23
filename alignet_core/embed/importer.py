"""Stage 0 from embeddings a lab already has: copy an inspected (n, p) array into the embed stage's store.

The store is the one extraction writes (`io.embedding_store`: `embeddings` (n, p) `embed.store_dtype`,
`ids`, `valid` all True), so every later stage runs unchanged. Rows are copied chunk by chunk
(`embed.chunk_rows` rows, the store's chunk), each chunk marked done after it is written
(`ChunkProgress`), so a killed import resumes where it stopped, ending with the very bytes an
uninterrupted import writes. Consecutive chunks are read and written together, up to about 64 MB
(`array_files.BLOCK_BYTES`): one Zarr write per chunk cost more than the copy itself. Memory is
one such block whatever n is. The store is raw (no codec): dense
embeddings barely compress and every later stage reads them whole.

Casting: the store holds `embed.store_dtype`. float16 input stays float16 in a float16 store and is
widened exactly into a float32 one; float32/float64 input is rounded to float16 in a float16 store
(refused by the inspection when a value lies beyond float16's range); bfloat16 and integer input are
converted to the store's dtype by numpy's rounding. The store's `import` attribute records the source
path, format, sha256, shape and dtype.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.errors import InputError
from alignet_core.io import array_files, embedding_sources, embedding_store
from alignet_core.io.embedding_sources import ArrayInfo

log = logging.getLogger(__name__)


def checked_import(cfg: PipelineConfig) -> ArrayInfo:
    """The inspection of `source` (`embedding_sources.inspect_embeddings`) with the store's dtype checked:
    everything the import needs to know before it writes anything."""
    info = embedding_sources.inspect_embeddings(cfg.source)
    embedding_sources.check_store_dtype(info, cfg.embed.store_dtype)
    return info


def provenance(cfg: PipelineConfig, info: ArrayInfo) -> dict:
    """The store's attributes: where its rows came from and how they were stored."""
    return {"stage": "embed", "import": info.provenance(), "model": f"imported: {info.path}",
            "feature": "imported rows, as given", "store_dtype": cfg.embed.store_dtype,
            "chunk_rows": cfg.embed.chunk_rows, "n": info.shape[0], "feature_dim": info.shape[1]}


def copy_chunk(reader: array_files.ArrayReader, emb: Any, start: int, stop: int, store_dtype: str) -> None:
    """Rows [start, stop) of the source into the store's `embeddings`, cast to `store_dtype`; refused
    (`InputError`) when a row is not finite after the cast (a file changed since its inspection)."""
    block = np.asarray(reader.read(start, stop)).astype(store_dtype, copy=False)
    if not np.isfinite(block).all():
        row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise InputError(f"source.path: row {row} is not finite in the store's {store_dtype} (the file changed "
                         "since it was checked?); rerun to check it again")
    emb[start:stop] = block


def import_embeddings(cfg: PipelineConfig, ids: np.ndarray, store_url: str,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Copy the array `cfg.source` names into the store at `store_url`, resuming a killed import; `ids`:
    (n,) the source's image ids (its listing).

    Returns {"n", "dim", "n_valid", "skipped": [], "seconds", "imported": provenance}; `progress(done_rows,
    total_rows)` after every chunk."""
    t0 = time.perf_counter()
    info = checked_import(cfg)
    n, dim = info.shape
    a = array_files.locate(cfg.source)
    rows = cfg.embed.chunk_rows
    g = embedding_store.create_embedding_store(store_url, n, dim, ids, cfg.embed.store_dtype,
                                               rows, provenance(cfg, info), compressed=False)
    emb, valid = g["embeddings"], g["valid"]
    tracker = embedding_store.ChunkProgress(store_url)
    done = tracker.done()
    todo = [c for c in embedding_store.iter_chunks(n, rows) if c[0] not in done]
    rows_done = n - sum(stop - start for _, start, stop in todo)
    log.info("import %s (%s, %s %s) into %s: %d/%d chunks to do", info.path, info.format, info.shape, info.dtype,
             store_url, len(todo), -(-n // rows))
    if todo and not embedding_sources.unchanged(info):
        raise InputError(f"source.path: {info.path!r} changed since it was checked (size, mtime or inode); rerun to "
                         "check it again")
    per_run = max(1, array_files.BLOCK_BYTES // (dim * np.dtype(cfg.embed.store_dtype).itemsize * rows))
    with array_files.open_array(a) as reader:
        for run in _runs(todo, per_run):
            start, stop = run[0][1], run[-1][2]
            copy_chunk(reader, emb, start, stop, cfg.embed.store_dtype)  # one write of several whole chunks
            reader.release(start, stop)
            for i, first, last in run:
                tracker.mark(i)
                rows_done += last - first
                if progress is not None:
                    progress(rows_done, n)
    valid[:] = True  # every row is valid; written once (the same bytes whatever chunks a kill cut)
    if not todo and progress is not None:
        progress(n, n)
    seconds = time.perf_counter() - t0
    log.info("embed: imported %d rows (dim %d) from %s in %.1f s", n, dim, info.path, seconds)
    return {"n": n, "dim": dim, "n_valid": n, "skipped": [], "seconds": seconds, "imported": info.provenance()}


def _runs(todo: list[tuple[int, int, int]], most: int) -> list[list[tuple[int, int, int]]]:
    """The chunks to do, (index, start, stop), cut into runs of at most `most` consecutive chunks: one read
    and one Zarr write per run (a write per chunk cost more than the copy), each chunk marked after it."""
    out: list[list[tuple[int, int, int]]] = []
    for c in todo:
        if out and out[-1][-1][0] == c[0] - 1 and len(out[-1]) < most:
            out[-1].append(c)
        else:
            out.append([c])
    return out

"""Incremental embedding: a new store starts from the rows of the previous store of the same lineage.

A source that changed (images added, replaced or removed) gets a new embed key (its listing is part of
it, `io.listing`), but most of its images are the ones already embedded. The previous store is the
newest finished store of the same *lineage*: the same embed key with the listing left out (same teacher,
preprocessing, store dtype and chunking, compute identity and code version). Its rows whose image has the
same id and fingerprint (size, mtime_ns), or the same id and content sha256 (a touched image: `io.listing`),
are copied into the new store (`prefill`), in the new store's row order, so reuse survives reordering; only
added and changed images are embedded, removed ones drop out. The copy is exact (the stored dtype to
itself); a reused row equals what a full recompute gives up to the batch composition of the forward pass
(the same image in another batch: float32 rounding).

The store keeps `reused` (n,) bool, written last by the prefill: a resumed or multi-device run computes
exactly the rows it marks False, and a chunk wholly reused is marked done at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import fsspec
import numpy as np
import zarr

from alignet_core.embed.layers import LAYERS_GROUP
from alignet_core.io import embedding_store, store
from alignet_core.io.listing import DIGEST_ARRAY

log = logging.getLogger(__name__)

REUSED = "reused"  # (n,) bool in the store: rows copied from the previous store
SKIPPED_REUSED = "reused.json"  # under the store's `_skipped/`: the reused rows' skip reasons


@dataclass(frozen=True)
class RowReuse:
    """Rows to copy: row `new_rows[j]` of the new store is row `old_rows[j]` of the store at `url`.
    new_rows, old_rows: (k,) int64."""

    url: str
    new_rows: np.ndarray
    old_rows: np.ndarray


def reused_mask(g: zarr.Group) -> np.ndarray | None:
    """The store's (n,) bool `reused` mask, or None when it was not prefilled."""
    return np.asarray(g[REUSED][:], dtype=bool) if REUSED in g else None


def prefill(g: zarr.Group, url: str, reuse: RowReuse, skipped_dir: str, block_rows: int = 32768) -> np.ndarray:
    """Copy the reused rows (embeddings, valid, extra layers, content digests, skip reasons) from the previous
    store into the new store `g`, a block of whole chunks at a time (memory: one block), mark the chunks
    wholly reused as done, and write `reused` last. Returns it, (n,) bool. Idempotent: a prefill killed
    midway redoes it."""
    old = embedding_store.open_embeddings(reuse.url)
    emb, valid = g["embeddings"], g["valid"]
    n, chunk = emb.shape[0], int(emb.chunks[0])
    mask = np.zeros(n, dtype=bool)
    mask[reuse.new_rows] = True
    src_of = np.full(n, -1, dtype=np.int64)
    src_of[reuse.new_rows] = reuse.old_rows
    old_valid = np.asarray(old["valid"][:], dtype=bool)
    layer_names = list(g[LAYERS_GROUP].array_keys()) if LAYERS_GROUP in g else []
    # a previous store without digests leaves the reused rows' digests unknown (zero): a touch re-embeds them
    digests = [(DIGEST_ARRAY, g[DIGEST_ARRAY], old[DIGEST_ARRAY])] if DIGEST_ARRAY in g and DIGEST_ARRAY in old else []
    step = max(chunk, block_rows // chunk * chunk)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        rows = np.flatnonzero(mask[lo:hi]) + lo
        if not len(rows):
            continue
        olds = src_of[rows]
        order = np.argsort(olds)
        for name, dst, srcarr in [("embeddings", emb, old["embeddings"])] + [
                (f"{LAYERS_GROUP}/{k}", g[LAYERS_GROUP][k], old[LAYERS_GROUP][k]) for k in layer_names] + digests:
            got = embedding_store.gather_rows(srcarr, olds[order], dtype=dst.dtype)
            block = np.asarray(dst[lo:hi])
            block[rows[order] - lo] = got
            dst[lo:hi] = block
        v = np.asarray(valid[lo:hi])
        v[rows - lo] = old_valid[olds]
        valid[lo:hi] = v
    # the reused rows' skip reasons (an image that failed to decode fails again: it is reused, skipped)
    old_skipped = {s["id"]: s for s in read_skipped(reuse.url, skipped_dir)}
    ids = np.asarray(g["ids"][:])
    reused_skipped = [old_skipped[str(ids[r])] for r in np.flatnonzero(mask & ~np.asarray(valid[:], dtype=bool))
                      if str(ids[r]) in old_skipped]
    store.write_json_atomic(store.join(url, skipped_dir, SKIPPED_REUSED), reused_skipped)
    tracker = embedding_store.ChunkProgress(url)
    for i, start, stop in embedding_store.iter_chunks(n, chunk):
        if mask[start:stop].all():
            tracker.mark(i)
    arr = g.create_array(REUSED, shape=(n,), dtype=bool, chunks=(max(n, 1),), fill_value=False, overwrite=True)
    arr[:] = mask
    log.info("embed: %d of %d rows reused from %s", int(mask.sum()), n, reuse.url)
    return mask


def read_skipped(url: str, skipped_dir: str) -> list[dict[str, str]]:
    """Every skip entry ({"id", "path", "reason"}) recorded under a store's `skipped_dir`, in row order."""
    fs, path = fsspec.core.url_to_fs(store.join(url, skipped_dir))
    if not fs.exists(path):
        return []
    out: list[dict[str, str]] = []
    for p in sorted(fs.ls(path, detail=False)):
        if p.endswith(".json"):
            with fs.open(p, "rb") as f:
                out.extend(json.loads(f.read()))
    return out

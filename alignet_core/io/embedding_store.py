"""Embedding stores: Zarr v3 groups of `embeddings` (n, p), `ids` (n,) str and `valid` (n,) bool.

`valid` is False for an image that could not be decoded: its row stays, zero, so no other row
shifts. Provenance goes in the group's attributes. Long writes record each finished chunk as a
marker file under `_progress/` (`ChunkProgress`), so a killed writer resumes without duplicated
or lost rows. Readers take rows chunk by chunk (`iter_chunks`, `gather_rows`); a raw local store
is read straight into a buffer or memory-mapped (`RawChunkReader`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import sys
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import zarr

from alignet_core.errors import InputError, StoreError
from alignet_core.io.store import join, local_path, makedirs, publish_dir, remove

log = logging.getLogger(__name__)


def _not_finite_error(url: str, count: int, row: int, ids: np.ndarray) -> InputError:
    return InputError(
        f"{url}: {count} valid embedding row(s) hold NaN or inf, first row {row} (id {str(ids[row])!r}); "
        "embeddings must be finite: check the model's weights and embed.store_dtype (float16 overflows), "
        "then recompute the store"
    )


def check_finite_rows(x: np.ndarray, valid: np.ndarray, url: str, ids: np.ndarray, offset: int = 0) -> None:
    """`InputError` naming the store, row and image id when a valid row of x (m, p) holds NaN or inf.

    valid: (m,) bool; ids: the store's (n,) ids; offset: the store row of x[0]."""
    bad = np.flatnonzero(np.asarray(valid, dtype=bool) & ~np.isfinite(x).all(axis=1))
    if len(bad):
        raise _not_finite_error(url, len(bad), offset + int(bad[0]), ids)


#: rows per read of a whole-store pass (`check_store_finite`): whole row chunks, about this many rows
PASS_ROWS = 32768


def check_store_finite(g: zarr.Group, url: str, valid: np.ndarray | None = None) -> None:
    """`check_finite_rows` over a whole store, read in blocks of whole row chunks (about `PASS_ROWS`
    rows, in the store's dtype): memory is one block, never the store. The error counts every bad
    valid row of the store and names the first. valid: the store's (n,) `valid`, when already read."""
    emb = g["embeddings"]
    n = emb.shape[0]
    valid = np.asarray(g["valid"][:] if valid is None else valid, dtype=bool)
    chunk = int(emb.chunks[0])
    count, first = 0, -1
    for _, start, stop in iter_chunks(n, max(chunk, PASS_ROWS // chunk * chunk)):
        bad = np.flatnonzero(valid[start:stop] & ~np.isfinite(np.asarray(emb[start:stop])).all(axis=1))
        if len(bad):
            count += len(bad)
            first = start + int(bad[0]) if first < 0 else first
    if count:
        raise _not_finite_error(url, count, first, np.asarray(g["ids"][:]))


# ----------------------------------------------------------------------------- chunk progress
class ChunkProgress:
    """Records finished chunks of a long write as marker files `<store>/_progress/<i>.done`."""

    def __init__(self, store_url: str) -> None:
        self.dir = join(store_url, "_progress")
        makedirs(self.dir)

    def done(self) -> set[int]:
        fs, path = fsspec.core.url_to_fs(self.dir)
        names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
        return {int(n.split(".")[0]) for n in names if n.endswith(".done")}

    def mark(self, index: int) -> None:
        fs, path = fsspec.core.url_to_fs(join(self.dir, f"{index:08d}.done"))
        with fs.open(path, "wb") as f:
            f.write(b"")

    def clear(self) -> None:
        remove(self.dir)


# ----------------------------------------------------------------------------- embedding stores
def remove_partial_writes(url: str) -> int:
    """Delete the temporary files (`*.partial`) that zarr's local store leaves when a writer is killed between
    writing a chunk and renaming it into place; returns how many. Call it only where no writer of the store can
    be running (before a resumed run's chunks start). A remote store has none (a no-op)."""
    try:
        root = local_path(url)
    except StoreError:
        return 0
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".partial"):
                os.remove(os.path.join(folder, name))
                removed += 1
    if removed:
        log.info("%s: removed %d partial chunk writes of an interrupted run", url, removed)
    return removed


def create_embedding_store(
    url: str,
    n: int,
    dim: int,
    ids: np.ndarray,
    dtype: str,
    chunk_rows: int,
    attrs: dict[str, Any],
    compressed: bool = True,
    rows: dict[str, np.ndarray] | None = None,
    digests: str | None = None,
) -> zarr.Group:
    """Create (or reopen for resume) an embedding store: `embeddings` (n, dim) `dtype`, `ids` (n,) str,
    `valid` (n,) bool (all False until the writer sets each written row).

    `compressed` keeps Zarr's default codec (zstd) for the embeddings; False stores them raw.
    Raw suits stores read whole many times (the transformed store: clustering, every sampling
    shard): dense float features barely compress, and decoding made each full read several
    times slower (`benchmarks/store_read.py`). Extracted features after a ReLU compress well.

    `rows`: further per-row (n,) arrays kept whole beside the ids (the listing's fingerprints of the
    images: `source_size`, `source_mtime_ns`). `digests`: the name of a (n, 32) uint8 array, chunked as the
    embeddings, all zero (unknown) until the writer of each chunk sets its rows' content sha256
    (`io.listing.DIGEST_ARRAY`: a touched image is then known unchanged).

    Reopening checks that shape, dtype and ids match what was asked, so a resumed write can never
    mix rows of two different runs.
    """
    if len(ids) != n:
        raise StoreError(f"{url!r}: {len(ids)} ids for {n} rows")
    try:
        g = zarr.open_group(url, mode="r+")
        emb = g["embeddings"]
        if emb.shape != (n, dim) or str(emb.dtype) != dtype or not np.array_equal(np.asarray(g["ids"][:]).tolist(), np.asarray(ids).tolist()):
            raise StoreError(f"{url!r} exists with another shape/dtype/ids; remove it or use a new key")
        return g
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        pass
    # Built under a temporary name and renamed into place, so a store at `url` always has its
    # arrays, ids and attributes: a writer killed while creating it leaves only a `.tmp-*` folder.
    remove(url)
    tmp = f"{url.rstrip('/')}.tmp-{uuid.uuid4().hex}"
    try:
        g = zarr.open_group(tmp, mode="w")
        g.create_array("embeddings", shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim), fill_value=0,
                       compressors="auto" if compressed else None)
        g.create_array("valid", shape=(n,), dtype=bool, chunks=(chunk_rows,), fill_value=False)
        ids_arr = g.create_array("ids", shape=(n,), dtype=str, chunks=(max(n, 1),))
        if n:
            ids_arr[:] = np.array(np.asarray(ids).tolist(), dtype=str)
        for name, values in (rows or {}).items():
            if len(values) != n:
                raise StoreError(f"{url!r}: {len(values)} values of {name!r} for {n} rows")
            arr = g.create_array(name, shape=(n,), dtype=np.asarray(values).dtype, chunks=(max(n, 1),))
            if n:
                arr[:] = np.asarray(values)
        if digests is not None:
            g.create_array(digests, shape=(n, 32), dtype="uint8", chunks=(chunk_rows, 32), fill_value=0)
        g.attrs.update(attrs)
        publish_dir(tmp, url)
    finally:
        # a failed create (disk full) may leave a Zarr write still landing in tmp, so removing it can
        # race; the original error must surface, and a rerun clears leftover `.tmp-*` folders
        with contextlib.suppress(OSError):
            remove(tmp)
    return zarr.open_group(url, mode="r+")


def open_embeddings(url: str) -> zarr.Group:
    """Open an embedding store read-only; `StoreError` naming the path when it is missing or wrong."""
    try:
        g = zarr.open_group(url, mode="r")
        g["embeddings"], g["ids"], g["valid"]
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        raise StoreError(f"{url!r} is not an embedding store (needs arrays 'embeddings', 'ids' and 'valid')") from None
    return g


#: mmap flag placing a map at exactly the given address (Linux <sys/mman.h>; not in Python's mmap)
_MAP_FIXED = 0x10


class RawChunkReader:
    """Reads whole row chunks of a raw (codec-free) Zarr v3 array on local disk straight into a
    caller's buffer with one `readinto`, skipping Zarr's per-read machinery.

    Gathers from the transformed store (raw, see `create_embedding_store`) touch nearly every
    chunk; this path skips Zarr's per-read buffers and event loop
    (`benchmarks/store_read.py`: `raw_chunk_reader_s` vs `raw_read_s`). `for_array`
    gives None for anything else (compressed, remote, big-endian, column-chunked), and `read`
    returns False for a chunk without a file of the full chunk size (never written: Zarr's
    fill value), so callers fall back to the normal read. `map_rows` memory-maps the whole array
    instead, for random row access without any copy.
    """

    def __init__(self, root: str, array: zarr.Array) -> None:
        self._root, self._array = root, array
        self.chunk_rows = int(array.chunks[0])
        self._nbytes = self.chunk_rows * int(array.shape[1]) * array.dtype.itemsize

    @classmethod
    def for_array(cls, array: Any) -> RawChunkReader | None:
        """A reader when `array` is a 2-d, row-chunked, raw little-endian v3 array in a local store."""
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        if not isinstance(array, zarr.Array) or array.metadata.zarr_format != 3 or array.ndim != 2:
            return None
        codecs = array.metadata.codecs
        raw = len(codecs) == 1 and isinstance(codecs[0], BytesCodec) and (
            codecs[0].endian is None or codecs[0].endian.value == "little")
        if not raw or not np.little_endian or not isinstance(array.store, LocalStore) or array.chunks[1] != array.shape[1]:
            return None
        return cls(os.path.join(str(array.store.root), array.path), array)

    def _chunk_path(self, chunk: int) -> str:
        return os.path.join(self._root, self._array.metadata.encode_chunk_key((chunk, 0)))

    def read(self, chunk: int, out: np.ndarray) -> bool:
        """Fill out (chunk_rows, p) C-contiguous with row chunk `chunk`; False if there is no full chunk file."""
        try:
            with open(self._chunk_path(chunk), "rb", buffering=0) as f:
                return f.readinto(memoryview(out).cast("B")) == self._nbytes and not f.read(1)
        except FileNotFoundError:
            return False

    def map_rows(self) -> np.ndarray | None:
        """The whole (n, p) array, read-only, as private memory maps of its chunk files laid end
        to end in one address range; None where that cannot be done (not Linux, a chunk size in
        bytes that is not a multiple of the page size, a chunk without a file of the full chunk
        size, or a map the system refuses: address-space limit, `vm.max_map_count` maps).

        Nothing is read or copied here: the kernel pages in, from its page cache, only the pages
        a caller touches, shares them between all processes mapping the same files, and may drop
        them again under memory pressure, so a worker holds no private copy of the rows. Sampling
        shards use it for their random row gathers (`benchmarks/results/sampling_full.json`).
        The maps live as long as the returned array or any view of it; a chunk file replaced
        or deleted meanwhile (an atomic republish) stays mapped as it was, but one truncated in
        place would fault the reader (SIGBUS): map only published stores, which nothing rewrites.
        """
        if sys.platform != "linux" or self._nbytes % mmap.PAGESIZE:
            return None
        n, p = self._array.shape
        n_chunks = -(-n // self.chunk_rows)
        paths = [self._chunk_path(c) for c in range(n_chunks)]
        try:
            if any(os.path.getsize(path) != self._nbytes for path in paths):
                return None
        except FileNotFoundError:
            return None
        try:
            # reserve the range with one anonymous map that owns it: freeing the returned array
            # frees this object, whose munmap removes the file maps placed over it
            region = mmap.mmap(-1, n_chunks * self._nbytes, access=mmap.ACCESS_READ)
        except OSError as err:
            log.warning("cannot memory-map %s (%s); reading its chunks instead", self._root, err)
            return None
        base = np.frombuffer(region, dtype=np.uint8).ctypes.data
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        for c, path in enumerate(paths):
            at = base + c * self._nbytes
            fd = os.open(path, os.O_RDONLY)
            try:
                got = libc.mmap(at, self._nbytes, mmap.PROT_READ, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            finally:
                os.close(fd)
            if got != at:
                log.warning("cannot memory-map %s (%s); reading its chunks instead", path, os.strerror(ctypes.get_errno()))
                return None  # freeing `region` removes the maps already placed
        return np.frombuffer(region, dtype=self._array.dtype, count=n * p).reshape(n, p)


def iter_chunks(n: int, chunk_rows: int) -> Iterable[tuple[int, int, int]]:
    """(chunk index, start, stop) over n rows."""
    for i, start in enumerate(range(0, n, chunk_rows)):
        yield i, start, min(start + chunk_rows, n)


#: rows per read when gathering from a numpy array or a store without chunk information
GATHER_BLOCK_ROWS = 65536


def gather_rows(
    array: Any, rows: np.ndarray, block_rows: int = GATHER_BLOCK_ROWS, dtype: Any = np.float32
) -> np.ndarray:
    """Read selected rows of a 2-d array (Zarr or numpy), chunk by chunk.

    array: (n, p) zarr.Array or np.ndarray (float16/float32); rows: (u,) int, sorted and unique.
    Returns (u, p) `dtype` (float32 by default; pass the store's float16 to halve the memory of
    a large gather). For a Zarr array the reads are aligned to its row chunks: every chunk that
    holds at least one requested row is read once, as one contiguous slice (one decode), and
    the requested rows are copied out of it, so memory is one chunk plus the output (raw local
    stores are read by `embedding_store.RawChunkReader` into one reused chunk buffer). Chunks holding none
    of the rows are never read. `block_rows` only bounds the read size of arrays
    without a chunk shape.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n, p = array.shape
    out = np.empty((len(rows), p), dtype=dtype)
    if len(rows) == 0:
        return out
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise InputError("rows: expected sorted, unique row indices")
    if rows[0] < 0 or rows[-1] >= n:
        raise InputError(f"rows: indices must lie in [0, {n}), got [{rows[0]}, {rows[-1]}]")
    if isinstance(array, np.ndarray):
        for lo in range(0, len(rows), block_rows):
            out[lo : lo + block_rows] = array[rows[lo : lo + block_rows]]
        return out
    chunk = int(getattr(array, "chunks", (block_rows,))[0]) or block_rows
    chunk_of = rows // chunk
    # positions in `rows` where a new chunk starts
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(rows)]])
    raw = RawChunkReader.for_array(array)
    buf = np.empty((chunk, p), dtype=array.dtype) if raw is not None else None
    for a, b in zip(starts.tolist(), stops.tolist()):
        c = int(chunk_of[a])
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        block = buf[: hi - lo] if raw is not None and raw.read(c, buf) else np.asarray(array[lo:hi])
        if b - a == hi - lo:  # every row of the chunk
            out[a:b] = block
        elif out.dtype == block.dtype:  # straight into the output, no temporary
            # mode="clip": rows are checked above, and take() buffers `out` in its default "raise" mode
            # (2.7× slower here)
            np.take(block, rows[a:b] - lo, axis=0, out=out[a:b], mode="clip")
        else:
            out[a:b] = block[rows[a:b] - lo]
    return out

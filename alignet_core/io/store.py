"""The artifact store: content keys, stage directories, manifests, chunk progress, atomic publish.

Layout under the pipeline root (a local path or fsspec URL):

    <root>/stages/<stage>/<key>/manifest.json   written last; its presence means "complete"
    <root>/stages/<stage>/<key>/...             the stage's outputs (Zarr stores, files)

A content key is the hash of the stage's config, the keys of its inputs and the source of the
code that computes it, so a complete manifest under a key can be reused as is.

An embedding store is a Zarr v3 group with `embeddings` (n, p), `ids` (n,) str, `valid` (n,) bool
(False for an image that could not be decoded: its row stays, zero, so no other row shifts) and
provenance attributes; long writes record each finished chunk as a marker file under `_progress/`, so a
killed writer resumes without duplicated or lost rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import inspect
import io
import json
import logging
import mmap
import os
import posixpath
import re
import sys
import uuid
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import InputError, StoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- paths
def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL/path segments with '/' (works for local paths and fsspec URLs)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = _fs(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Remove a file or directory tree if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_inside(url: str, root: str) -> bool:
    """True when `url` is `root` or lies under it once '.', '..' and (locally) symlinks are resolved."""
    if not isinstance(url, str) or not url:
        return False
    fs_u, p_u = _fs(url)
    fs_r, p_r = _fs(root)
    if type(fs_u) is not type(fs_r):
        return False
    if isinstance(fs_u, LocalFileSystem):
        p_u, p_r = os.path.realpath(p_u), os.path.realpath(p_r)
    else:
        p_u, p_r = posixpath.normpath(p_u), posixpath.normpath(p_r)
    return p_u == p_r or p_u.startswith(p_r.rstrip("/") + "/")


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")


def remove_temporaries(dir_url: str) -> int:
    """Remove the `*.tmp-<uuid>` files and folders that writers killed mid-write left in a directory.

    Call only while holding the directory's writer lock (`alignet_core.io.lock`): a live writer's
    temporaries look the same. Returns how many were removed."""
    fs, path = _fs(dir_url)
    if not fs.isdir(path):
        return 0
    stale = [p for p in sorted(fs.find(path, withdirs=True)) if _TEMPORARY.search(p.rstrip("/"))]
    removed = 0
    for p in stale:
        if any(p.startswith(q.rstrip("/") + "/") for q in stale if q != p):
            continue  # inside a stale folder removed with it
        fs.rm(p, recursive=True)
        removed += 1
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted writer", dir_url, removed)
    return removed


def remove_temporaries_of(url: str) -> int:
    """Remove the `<url>.tmp-<uuid>` siblings of `url` (temporary copies an interrupted writer of `url`
    left); other names in the same folder are untouched. Call only while holding `url`'s writer lock."""
    fs, path = _fs(url)
    stale = [p for p in fs.glob(f"{path.rstrip('/')}.tmp-*") if _TEMPORARY.search(p.rstrip("/"))]
    for p in stale:
        fs.rm(p, recursive=True)
    if stale:
        log.info("%s: removed %d temporary copy(ies) left by an interrupted writer", url, len(stale))
    return len(stale)


def check_finite_rows(x: np.ndarray, valid: np.ndarray, url: str, ids: np.ndarray, offset: int = 0) -> None:
    """`InputError` naming the store, row and image id when a valid row of x (m, p) holds NaN or inf.

    valid: (m,) bool; ids: the store's (n,) ids; offset: the store row of x[0]."""
    bad = np.flatnonzero(np.asarray(valid, dtype=bool) & ~np.isfinite(x).all(axis=1))
    if len(bad):
        row = offset + int(bad[0])
        raise InputError(
            f"{url}: {len(bad)} valid embedding row(s) hold NaN or inf, first row {row} (id {str(ids[row])!r}); "
            "embeddings must be finite: check the model's weights and embed.store_dtype (float16 overflows), "
            "then recompute the store"
        )


def local_path(url: str) -> str:
    """The filesystem path of a local URL; `StoreError` for a remote one."""
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        raise StoreError(f"{url!r}: this operation needs a local path, got a {type(fs).__name__} URL")
    return path


# ----------------------------------------------------------------------------- keys
def code_version(*modules: ModuleType) -> str:
    """Hash of the source of the modules that compute a stage (changes when their code does)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()[:16]


def content_key(stage: str, config: Any, inputs: Iterable[str] = (), code: str = "") -> str:
    """Stable hash of a stage's config (JSON-able), its input keys and its code version."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": list(inputs), "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_dir(root: str, stage: str, key: str) -> str:
    return join(root, "stages", stage, key)


# ----------------------------------------------------------------------------- json + manifests
def write_json_atomic(url: str, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()
    fs, path = _fs(url)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _discard(fs, tmp)
            raise
    else:  # object stores replace whole objects atomically
        with fs.open(path, "wb") as f:
            f.write(data)


def write_bytes_atomic(url: str, payload: bytes) -> None:
    """Write a file through a temporary name and one rename, so readers never see a partial file."""
    fs, path = _fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(payload)
        fs.mv(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no temporary file behind
        _discard(fs, tmp)
        raise


def _discard(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a temporary file if it is there; never raises (it runs while another error propagates)."""
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception as err:  # noqa: BLE001
        log.warning("could not remove temporary file %s: %s", path, err)


def read_npy(url: str, what: str) -> np.ndarray:
    """Load a `.npy` array without pickles; `InputError` naming `what` and the file otherwise."""
    try:
        with fsspec.open(url, "rb") as f:
            return np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} file {url!r} does not exist") from None
    except ValueError as err:
        raise InputError(f"{url}: not a .npy array ({err})") from None


def write_npy(url: str, arr: np.ndarray) -> None:
    """Write a `.npy` array without pickles, atomically (readers never see a partial file)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    write_bytes_atomic(url, buf.getvalue())


@contextlib.contextmanager
def disk_full_as_store_error(dir_url: str) -> Iterator[None]:
    """Turn "no space left on device" (or an exceeded quota) inside the block into a `StoreError`
    naming the directory; what was finished stays, so a rerun after freeing space resumes."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreError(
            f"{dir_url!r}: no space left on the device while writing ({err.strerror}: {err.filename or 'a file'}); "
            "free space or move the root, then rerun: finished chunks and shards are kept and the stage resumes"
        ) from err


def read_safetensors(url: str, what: str) -> dict[str, np.ndarray]:
    """Load a safetensors file as numpy arrays; `InputError` naming `what` and the file otherwise."""
    from safetensors.numpy import load as st_load

    try:
        with fsspec.open(url, "rb") as f:
            return st_load(f.read())
    except FileNotFoundError:
        raise InputError(f"{what} file {url!r} does not exist") from None
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise InputError(f"{url}: not a safetensors {what} file ({err})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(url: str) -> Any:
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise StoreError(f"{url!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise StoreError(f"{url!r} is not valid JSON: {err}") from None


def is_complete(dir_url: str) -> bool:
    """A stage directory is complete when its manifest exists."""
    return exists(join(dir_url, MANIFEST))


def write_manifest(dir_url: str, manifest: dict[str, Any]) -> None:
    """Mark a stage directory complete; call only after every output is written."""
    write_json_atomic(join(dir_url, MANIFEST), {**manifest, "complete": True})


def read_manifest(dir_url: str) -> dict[str, Any]:
    if not is_complete(dir_url):
        raise StoreError(f"{dir_url!r} has no manifest: the stage that writes it did not finish")
    return read_json(join(dir_url, MANIFEST))


def file_sha256(url: str) -> str:
    fs, path = _fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish_dir(tmp_url: str, final_url: str) -> None:
    """Move a fully written directory into place by one rename (atomic on a local filesystem)."""
    fs, tmp = _fs(tmp_url)
    _, final = _fs(final_url)
    if fs.exists(final):
        raise StoreError(f"{final_url!r} already exists; refusing to overwrite a published artifact")
    fs.makedirs(os.path.dirname(final), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        os.rename(tmp, final)
    else:
        fs.mv(tmp, final, recursive=True)


# ----------------------------------------------------------------------------- chunk progress
class ChunkProgress:
    """Records finished chunks of a long write as marker files `<store>/_progress/<i>.done`."""

    def __init__(self, store_url: str) -> None:
        self.dir = join(store_url, "_progress")
        makedirs(self.dir)

    def done(self) -> set[int]:
        fs, path = _fs(self.dir)
        names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
        return {int(n.split(".")[0]) for n in names if n.endswith(".done")}

    def mark(self, index: int) -> None:
        fs, path = _fs(join(self.dir, f"{index:08d}.done"))
        with fs.open(path, "wb") as f:
            f.write(b"")

    def clear(self) -> None:
        remove(self.dir)


# ----------------------------------------------------------------------------- embedding stores
def create_embedding_store(
    url: str,
    n: int,
    dim: int,
    ids: np.ndarray,
    dtype: str,
    chunk_rows: int,
    attrs: dict[str, Any],
    compressed: bool = True,
) -> zarr.Group:
    """Create (or reopen for resume) an embedding store: `embeddings` (n, dim) `dtype`, `ids` (n,) str,
    `valid` (n,) bool (all False until the writer sets each written row).

    `compressed` keeps Zarr's default codec (zstd) for the embeddings; False stores them raw.
    Raw suits stores read whole many times (the transformed store: clustering, every sampling
    shard): dense float features barely compress, and decoding made each full read several
    times slower (`benchmarks/store_read.py`). Extracted features after a ReLU compress well.

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
    def for_array(cls, array: Any) -> "RawChunkReader | None":
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

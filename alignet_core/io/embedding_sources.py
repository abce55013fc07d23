"""Embeddings a lab already has (`source.kind: embeddings`): find, read and check an (n, p) array.

Formats: `.npy` (memory-mapped, never loaded whole), HDF5 (`.h5`/`.hdf5`, the optional `hdf5` extra =
h5py), Zarr (an array, or a group and `source.dataset`), `.pt` (a torch tensor, or a dict of them,
loaded with `weights_only=True` and memory-mapped) and a thingsvision output folder (`save_features`
writes `features.npy`, `features.hdf5` (dataset `features`) or `features.pt`; its image dataset writes
`file_names.txt`, one image path per line in row order, which gives the ids). Every reader hands out
row blocks (`ArrayReader.read`), so memory stays one block whatever n is.

`inspect_embeddings` is the one check of an array before any work (preflight and the import both call
it): a readable file, a 2-d numeric array, ids and labels that match its rows, no duplicate id, and
no NaN or infinite row; rows beyond float16's range are noted, and refused by `check_store_dtype`
only when the store is float16 (`embed.store_dtype`). The value scan reads the
whole array once, in blocks; for a C-order `.npy` the same pass computes the file's sha256, so the
file is read once. The sha256 identifies the data in every stage's key: a copied, moved or touched
file keeps its key, a changed one gets a new one. Reading 2.5 GB costs seconds, so an inspection is
remembered per file state (path, size, mtime in ns, inode) in this process and in
`$XDG_CACHE_HOME/alignet/embeddings/` (as git and DVC remember file hashes): a rerun checks a stat,
not the bytes. An array rewritten in place with the same size and nanosecond mtime would fool it; a
file the import finds changed since its inspection is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignet_core.errors import InputError
from alignet_core.io.array_files import ArrayFile, ArrayReader, locate, npy_header, open_array
from alignet_core.io.store import file_sha256

if TYPE_CHECKING:
    from alignet_core.io.source_config import SourceConfig

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)
#: version of what an inspection checks; a cached inspection of another version is redone
INSPECTION_VERSION = 1


@dataclass(frozen=True)
class ArrayInfo:
    """What the inspection of an array found (it passed every check)."""

    format: str
    path: str
    dataset: str | None
    shape: tuple[int, int]
    dtype: str
    sha256: str
    ids_sha256: str
    labels_sha256: str | None
    #: rows beyond float16's range ±65504 (a float16 store would hold inf there): how many, the first few
    #: as (row, id)
    n_float16_overflow: int = 0
    float16_overflow: list[tuple[int, str]] = field(default_factory=list)
    state: dict[str, int] = field(default_factory=dict)  # the file's size, mtime_ns, inode when inspected

    def provenance(self) -> dict[str, Any]:
        """The store's `import` attribute: where the rows came from, and their identity."""
        return {"path": self.path, "format": self.format, "dataset": self.dataset, "sha256": self.sha256,
                "shape": list(self.shape), "dtype": self.dtype, "ids_sha256": self.ids_sha256,
                "labels_sha256": self.labels_sha256}


def read_lines(path: str, field_name: str) -> list[str]:
    """The lines of a text file (surrounding whitespace stripped; a final newline ends the last line);
    `InputError` naming `field_name` when it is missing."""
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f.read().splitlines()]
    except FileNotFoundError:
        raise InputError(f"{field_name}: file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{field_name}: cannot read {path!r} as UTF-8 text: {err}") from None


def read_ids(a: ArrayFile) -> list[str]:
    """The row ids: one per line, each non-empty and unique (`InputError` naming `source.ids`, with a few
    offenders)."""
    if a.ids is None:
        raise InputError("source.ids: required for source.kind 'embeddings' with format "
                         f"{a.format!r}: a text file of image ids, one per line in row order")
    ids = read_lines(a.ids, "source.ids")
    empty = [i + 1 for i, x in enumerate(ids) if not x]
    if empty:
        raise InputError(f"source.ids: {a.ids!r}: {len(empty)} empty line(s), e.g. line(s) {empty[:5]}; every row needs "
                         "an id")
    if len(set(ids)) == len(ids):  # the common case, 10× cheaper than counting
        return ids
    dup = [(x, c) for x, c in Counter(ids).items() if c > 1]
    if dup:
        raise InputError(f"source.ids: {a.ids!r}: {len(dup)} duplicate id(s), each id must be unique; e.g. "
                         + ", ".join(f"{x!r} ({c}×)" for x, c in dup[:5]))
    return ids


# ----------------------------------------------------------------------------- the inspection
def file_state(path: str) -> dict[str, int]:
    """A file's (or a folder's newest file's) size, mtime in ns and inode: what says it is unchanged."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    files = [q for q in p.rglob("*") if q.is_file()]
    stats = [q.stat() for q in files]
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
            "inode": p.stat().st_ino, "files": len(files)}


def _files_sha256(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path, then bytes, in sorted order)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for q in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(q.relative_to(p).as_posix().encode() + b"\0")
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _bad_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows holding NaN or inf, finite rows with a value beyond float16's range), block-relative."""
    x = np.asarray(block)
    finite = np.isfinite(x).all(axis=1) if x.dtype.kind == "f" else np.ones(len(x), dtype=bool)
    if x.dtype == np.float16 or (x.dtype.kind in "iu" and x.dtype.itemsize == 1):
        return np.flatnonzero(~finite), np.empty(0, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        big = (np.abs(x) > FLOAT16_MAX).any(axis=1)
    return np.flatnonzero(~finite), np.flatnonzero(big & finite)


@dataclass
class _Scan:
    bad: list[int] = field(default_factory=list)  # first rows with NaN or inf
    n_bad: int = 0
    big: list[int] = field(default_factory=list)  # first finite rows beyond float16's range
    n_big: int = 0
    sha256: str | None = None


def _scan(reader: ArrayReader, a: ArrayFile) -> _Scan:
    """One pass over the rows: the rows with NaN or inf and those beyond float16's range (the first 5
    of each, and counts) and, for a C-order .npy, the file's sha256 from the same bytes (else None:
    hashed separately)."""
    n = reader.shape[0]
    h = None
    tail_from = None
    if a.format == "npy" and Path(a.path).is_file():
        _, fortran, dtype, offset = npy_header(a.path)
        if not fortran:
            h = hashlib.sha256()
            with open(a.path, "rb") as f:
                h.update(f.read(offset))
            tail_from = offset + int(np.prod(reader.shape)) * dtype.itemsize
    out = _Scan()
    step = reader.block_rows()
    for start in range(0, n, step):
        block = reader.read(start, min(start + step, n))
        if h is not None:
            h.update(np.ascontiguousarray(block).view(np.uint8).reshape(-1))
        bad, big = _bad_rows(block)
        out.n_bad, out.n_big = out.n_bad + len(bad), out.n_big + len(big)
        out.bad.extend(int(start + r) for r in bad[: max(0, 5 - len(out.bad))])
        out.big.extend(int(start + r) for r in big[: max(0, 5 - len(out.big))])
        reader.release(start, min(start + step, n))
    if h is not None and tail_from is not None:
        with open(a.path, "rb") as f:
            f.seek(tail_from)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    out.sha256 = None if h is None else h.hexdigest()
    return out


def _cache_file(a: ArrayFile, labels: str | None) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignet" / "embeddings"
    what = json.dumps([INSPECTION_VERSION, os.path.realpath(a.path), asdict(a), labels,
                       file_state(a.path), file_state(a.ids) if a.ids else None, file_state(labels) if labels else None],
                      sort_keys=True)
    return base / f"{hashlib.sha256(what.encode()).hexdigest()[:32]}.json"


_MEMO: dict[str, ArrayInfo] = {}


def inspect_embeddings(cfg: SourceConfig) -> ArrayInfo:
    """Check the array `cfg` names before any work (see the module doc); `InputError` naming the field and
    what is wrong. Remembered per file state, in this process and on disk."""
    a = locate(cfg)
    cache = _cache_file(a, cfg.labels)
    key = str(cache)
    if key in _MEMO:
        return _MEMO[key]
    try:
        saved = json.loads(cache.read_text())
        info = ArrayInfo(**{**saved, "shape": tuple(saved["shape"]),
                            "float16_overflow": [tuple(x) for x in saved["float16_overflow"]]})
    except (OSError, ValueError, TypeError, KeyError):
        info = _inspect(a, cfg.labels)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(asdict(info)))
            os.replace(tmp, cache)
        except OSError as err:  # a read-only home: the inspection is redone next time
            log.warning("cannot cache the inspection of %s in %s: %s", a.path, cache, err)
    _MEMO[key] = info
    return info


def _inspect(a: ArrayFile, labels: str | None) -> ArrayInfo:
    ids = read_ids(a)
    with open_array(a) as reader:
        shape, dtype = reader.shape, reader.dtype
        where = f"{a.path!r}" + (f" (array {a.dataset!r})" if a.dataset else "")
        if len(shape) != 2:
            raise InputError(f"source.path: {where} has shape {shape}, rank {len(shape)}; expected a 2-d (n images, "
                             "p features) array")
        try:
            kind = "f" if dtype == "bfloat16" else np.dtype(dtype).kind
        except TypeError:  # a torch dtype numpy does not know (float8, quantized)
            kind = "?"
        if kind not in "fiu":
            raise InputError(f"source.path: {where} has dtype {dtype}; expected numbers (float16/32/64, or integers), "
                             "not Python objects, strings, booleans or complex values")
        n, p = shape
        if n == 0 or p == 0:
            raise InputError(f"source.path: {where} has shape {shape}; expected at least one row and one column")
        if len(ids) != n:
            raise InputError(f"source.ids: {a.ids!r} has {len(ids)} ids for the {n} rows of {where}; expected one id "
                             "per row, in row order")
        if labels is not None:
            n_labels = len(read_lines(labels, "source.labels"))
            if n_labels != n:
                raise InputError(f"source.labels: {labels!r} has {n_labels} lines for the {n} rows of {where}; "
                                 "expected one label per row, in row order")
        scan = _scan(reader, a)
    if scan.n_bad:
        raise InputError(f"source.path: {where}: {scan.n_bad} row(s) hold NaN or infinite values, e.g. row(s) "
                         + ", ".join(f"{r} (id {ids[r]!r})" for r in scan.bad)
                         + "; every row must be finite: fix or drop them (with their ids)")
    sha = scan.sha256 or _files_sha256(a.path)
    log.info("embeddings %s: %s %s (%s), sha256 %s", a.path, shape, dtype, a.format, sha[:12])
    return ArrayInfo(format=a.format, path=a.path, dataset=a.dataset, shape=(int(shape[0]), int(shape[1])),
                     dtype=str(dtype), sha256=sha, ids_sha256=file_sha256(str(a.ids)),
                     labels_sha256=None if labels is None else file_sha256(labels), n_float16_overflow=scan.n_big,
                     float16_overflow=[(r, ids[r]) for r in scan.big], state=file_state(a.path))


def check_store_dtype(info: ArrayInfo, store_dtype: str) -> None:
    """`InputError` naming `embed.store_dtype` when a float16 store would turn rows into inf."""
    if store_dtype == "float16" and info.n_float16_overflow:
        rows = ", ".join(f"{r} (id {i!r})" for r, i in info.float16_overflow)
        raise InputError(f"embed.store_dtype: float16 cannot hold {info.n_float16_overflow} row(s) of {info.path!r} "
                         f"(values beyond ±65504), e.g. row(s) {rows}; use float32 or rescale the embeddings")


def unchanged(info: ArrayInfo) -> bool:
    """The array's file is as it was when inspected (same size, mtime and inode)."""
    return file_state(info.path) == info.state


def ids_and_labels(cfg: SourceConfig) -> tuple[list[str], list[str] | None]:
    """The row ids (checked: non-empty, unique) and the labels (None without `source.labels`)."""
    a = locate(cfg)
    return read_ids(a), None if cfg.labels is None else read_lines(cfg.labels, "source.labels")


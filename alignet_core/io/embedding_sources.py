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
import mmap
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignet_core.errors import InputError
from alignet_core.io.store import file_sha256

if TYPE_CHECKING:
    from alignet_core.io.source_config import SourceConfig

log = logging.getLogger(__name__)

FORMATS = ("npy", "hdf5", "zarr", "pt", "thingsvision")
EXTENSIONS = {".npy": "npy", ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr", ".pt": "pt", ".pth": "pt"}
THINGSVISION_IDS = "file_names.txt"
THINGSVISION_FEATURES = (("features.npy", "npy"), ("features.hdf5", "hdf5"), ("features.pt", "pt"))
DEFAULT_NAMES = ("features", "embeddings")
#: bytes per block of the value scan and of the import's reads (rows are read whole)
BLOCK_BYTES = 64 << 20
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: version of what an inspection checks; a cached inspection of another version is redone
INSPECTION_VERSION = 1


@dataclass(frozen=True)
class ArrayFile:
    """Where the array is: its format, the file or folder, the array's name inside it (HDF5, Zarr group,
    .pt dict), and the ids file (the thingsvision folder's `file_names.txt` when not given)."""

    format: str
    path: str
    dataset: str | None
    ids: str | None


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


# ----------------------------------------------------------------------------- finding the array
def locate(cfg: SourceConfig) -> ArrayFile:
    """The array a `source.kind: embeddings` config names; `InputError` naming `source.path` /
    `source.format` when it is missing or of no known format."""
    path = str(cfg.path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"source.path: {path!r} does not exist (expected an embedding array: .npy, .h5/.hdf5, "
                         ".zarr, .pt, or a thingsvision output folder)")
    fmt = cfg.format
    if fmt == "auto":
        if p.is_dir() and (p / THINGSVISION_IDS).is_file():
            fmt = "thingsvision"
        elif p.is_dir() and p.suffix.lower() != ".zarr" and not (p / "zarr.json").exists() and not (p / ".zarray").exists() \
                and not (p / ".zgroup").exists():
            raise InputError(f"source.format: {path!r} is a folder with neither {THINGSVISION_IDS} (a thingsvision "
                             "output) nor Zarr metadata; set source.format or point source.path at the array file")
        else:
            fmt = "zarr" if p.is_dir() else EXTENSIONS.get(p.suffix.lower(), "")
            if not fmt:
                raise InputError(f"source.format: cannot tell the format of {path!r} from its extension "
                                 f"{p.suffix!r}; expected one of {sorted(EXTENSIONS)} or set source.format to one "
                                 f"of {list(FORMATS)}")
    if fmt != "thingsvision":
        return ArrayFile(fmt, path, cfg.dataset, cfg.ids)
    for name, inner in THINGSVISION_FEATURES:
        if (p / name).is_file():
            ids = cfg.ids or str(p / THINGSVISION_IDS)
            return ArrayFile(inner, str(p / name), cfg.dataset or ("features" if inner == "hdf5" else None), ids)
    split = sorted(q.name for q in p.glob("features_*"))
    hint = f" (split outputs {split[:3]}: merge them into one array first)" if split else ""
    raise InputError(f"source.path: thingsvision folder {path!r} holds none of "
                     f"{[n for n, _ in THINGSVISION_FEATURES]}{hint}")


# ----------------------------------------------------------------------------- reading rows
class ArrayReader:
    """Row blocks of a 2-d array in any supported format. `shape`, `dtype` (a numpy dtype, or
    'bfloat16' for such a tensor, read as float32) and `read(start, stop) -> (m, p) ndarray`."""

    def __init__(self, array: Any, dtype: str, to_numpy: Any = np.asarray) -> None:
        self._array, self.dtype, self._to_numpy = array, dtype, to_numpy
        self.shape: tuple[int, ...] = tuple(int(s) for s in array.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._to_numpy(self._array[start:stop])

    def block_rows(self) -> int:
        """Rows per read: about `BLOCK_BYTES` (at least one row)."""
        p = self.shape[1] if len(self.shape) > 1 else 1
        return max(1, BLOCK_BYTES // max(1, p * 8))

    def release(self, start: int, stop: int) -> None:
        """Done with rows [start, stop): a memory map drops their pages from this process (no-op here)."""


class MappedNpyReader(ArrayReader):
    """A C-order .npy memory map whose pages are handed back after each block (`release`): reading the
    whole file through a map would otherwise leave all of it resident in this process (file-backed
    pages the kernel counts as the process's memory until it needs them back)."""

    def __init__(self, mm: np.memmap, dtype: str) -> None:
        super().__init__(mm, dtype)
        self._map = getattr(mm, "_mmap", None)
        self._start = int(mm.offset) % mmap.ALLOCATIONGRANULARITY  # where the data begins in the map
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * mm.dtype.itemsize

    def release(self, start: int, stop: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = self._start + start * self._row_bytes
        lo -= lo % mmap.PAGESIZE
        hi = min(self._start + stop * self._row_bytes, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, read from its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f, max_header_size=1 << 20)
            return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise InputError(f"source.path: {path!r} is not a readable .npy file: {err}") from None


def _pick(names: list[str], is_2d: dict[str, bool], dataset: str | None, where: str) -> str:
    """The array's name in a container: `dataset`, else a default name, else the only 2-d array."""
    if dataset is not None:
        if dataset not in names:
            raise InputError(f"source.dataset: {where} has no array {dataset!r}; it holds {names[:10]}")
        return dataset
    for name in DEFAULT_NAMES:
        if name in names:
            return name
    two_d = [n for n in names if is_2d.get(n)]
    if len(two_d) == 1:
        return two_d[0]
    raise InputError(f"source.dataset: {where} holds {len(two_d)} 2-d arrays {two_d[:10]} and none named "
                     f"{list(DEFAULT_NAMES)}; set source.dataset to the embeddings' name")


def _torch_load(path: str) -> Any:
    """torch.load(weights_only=True), memory-mapped; a file in torch's legacy (pre-zip) format cannot be
    mapped and is loaded whole, with a warning."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "zipfile" not in str(err):
            raise
    log.warning("%s is in torch's legacy format, which cannot be memory-mapped: loading it whole", path)
    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def open_array(a: ArrayFile) -> Iterator[ArrayReader]:
    """An `ArrayReader` over the array `a` names, closed on exit; `InputError` naming the field when the
    file cannot be read as that format."""
    if a.format == "npy":
        shape, _, dtype, _ = _npy_header(a.path)
        if dtype.hasobject:
            raise InputError(f"source.path: {a.path!r} holds Python objects (dtype {dtype}); expected a numeric "
                             "(n, p) array")
        if not np.prod(shape):
            yield ArrayReader(np.zeros(shape, dtype), str(dtype))
            return
        mm = np.load(a.path, mmap_mode="r", allow_pickle=False)
        yield MappedNpyReader(mm, str(dtype)) if mm.flags.c_contiguous else ArrayReader(mm, str(dtype))
    elif a.format == "hdf5":
        try:
            import h5py
        except ImportError:
            raise InputError("source.format: reading HDF5 needs h5py: pip install 'alignet-pipeline[hdf5]'") from None
        try:
            f = h5py.File(a.path, "r")
        except OSError as err:
            raise InputError(f"source.path: {a.path!r} is not a readable HDF5 file: {err}") from None
        with f:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            name = _pick(names, {n: f[n].ndim == 2 for n in names}, a.dataset, f"HDF5 file {a.path!r}")
            ds = f[name]
            yield ArrayReader(ds, str(ds.dtype) if ds.dtype.kind != "O" else "object")
    elif a.format == "zarr":
        import zarr

        try:
            node = zarr.open(a.path, mode="r")
        except Exception as err:  # zarr raises several types for a folder that is not a store
            raise InputError(f"source.path: {a.path!r} is not a readable Zarr store: {err}") from None
        if isinstance(node, zarr.Group):
            arrays = {k: v for k, v in node.arrays()}
            name = _pick(sorted(arrays), {k: v.ndim == 2 for k, v in arrays.items()}, a.dataset, f"Zarr group {a.path!r}")
            node = arrays[name]
        elif a.dataset is not None:
            raise InputError(f"source.dataset: {a.path!r} is a Zarr array, not a group; leave source.dataset unset")
        yield ArrayReader(node, str(node.dtype))
    elif a.format == "pt":
        import torch

        try:
            obj = _torch_load(a.path)
        except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
            raise InputError(f"source.path: {a.path!r} is not a tensor file torch.load(weights_only=True) can read: "
                             f"{str(err).splitlines()[0][:200]}") from None
        if isinstance(obj, dict):
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors[_pick(sorted(tensors), {k: v.ndim == 2 for k, v in tensors.items()}, a.dataset,
                                f".pt file {a.path!r}")]
        elif a.dataset is not None:
            raise InputError(f"source.dataset: {a.path!r} holds one tensor, not a dict; leave source.dataset unset")
        if not isinstance(obj, torch.Tensor):
            raise InputError(f"source.path: {a.path!r} holds a {type(obj).__name__}, expected a tensor (n, p)")
        if obj.dtype == torch.bfloat16:  # numpy has no bfloat16: read as float32, exactly
            yield ArrayReader(obj, "bfloat16", lambda t: t.float().numpy())
        else:
            yield ArrayReader(obj, str(obj.dtype).removeprefix("torch."), lambda t: t.numpy())
    else:
        raise InputError(f"source.format: expected one of {list(FORMATS)} or 'auto', got {a.format!r}")


# ----------------------------------------------------------------------------- ids and labels
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
        _, fortran, dtype, offset = _npy_header(a.path)
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


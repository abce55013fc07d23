"""An existing embedding array on disk: where it is (`ArrayFile`, `locate`) and how its rows are read,
block by block (`open_array`: memory-mapped `.npy`, HDF5, Zarr, `.pt`, a thingsvision folder).
`embedding_sources` inspects and checks what these read."""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignet_core.errors import InputError

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


@dataclass(frozen=True)
class ArrayFile:
    """Where the array is: its format, the file or folder, the array's name inside it (HDF5, Zarr group,
    .pt dict), and the ids file (the thingsvision folder's `file_names.txt` when not given)."""

    format: str
    path: str
    dataset: str | None
    ids: str | None


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


def npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
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
        shape, _, dtype, _ = npy_header(a.path)
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

"""Bounded reads: small files may not cost gigabytes.

Every reader of a file a user hands in checks what it is about to allocate against what the file can
honestly hold, before allocating: a config's size, depth, aliases and number of values (`load_yaml`), an `.npz`'s
array headers against its zip entries (`check_npz`), an image's byte size (`check_image_size`), a tar
shard's label members, header members and member count (`io.sources`). And
error messages echo values through `short`, a repr bounded in length and depth, so a value that
expands (a YAML alias bomb) is never written out whole.
"""

from __future__ import annotations

import reprlib
import zipfile
from typing import IO, Any

import numpy as np
import yaml

from alignet_core.errors import ConfigError, InputError

MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a few KB
MAX_YAML_DEPTH = 64  # nested collections in a config or an override value
MAX_YAML_ALIASES = 1000  # `*alias` references in one document (a billion-laughs file needs many)
MAX_YAML_NODES = 20_000  # scalars and collections in one document: a config has a few hundred; a flat list
#                          filling the 1 MiB (500k values) took 10 s and 776 MB to parse (issue 34), 0.1 s now
MAX_IMAGE_BYTES = 256 << 20  # one image file (PIL's pixel limit already bounds the decoded size)
MAX_NPZ_RATIO = 200  # uncompressed / compressed size of one .npz entry above `_RATIO_FROM` bytes
MAX_NPZ_ENTRIES = 64  # an AligNet .npz has 3 arrays
MAX_LABEL_BYTES = 64 << 10  # one label member of a tar shard (`.cls`, `.txt`): a class name
MAX_TAR_HEADER_BYTES = 1 << 20  # one pax extended header or GNU long name in a tar shard (tarfile reads it whole)
MAX_TAR_MEMBERS = 100_000  # members of one tar shard (its index is kept in memory: ~1 KB each)
_RATIO_FROM = 16 << 20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 120, 120, 60


def short(value: Any, limit: int = 200) -> str:
    """A repr of `value` of at most `limit` characters, built without expanding it whole."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a limit on nesting depth, on alias references and on nodes (PyYAML parses
    lazily, event by event, so a refusal comes after at most that much work)."""

    def __init__(self, stream: Any, what: str):
        super().__init__(stream)
        self._what, self._depth, self._aliases, self._nodes = what, 0, 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{self._what}: more than {MAX_YAML_ALIASES} YAML aliases; refused")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            mark = self.peek_event().start_mark
            raise ConfigError(f"{self._what}: more than {MAX_YAML_NODES} values (at line {mark.line + 1}, column "
                              f"{mark.column + 1}); a config has a few hundred; refused")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self._what}: nested deeper than {MAX_YAML_DEPTH} levels at line "
                                  f"{mark.line + 1}, column {mark.column + 1}; refused")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, what: str) -> Any:
    """Parse one YAML document with bounded size, depth and aliases; `ConfigError` naming `what`
    (the file or the override) for too much, `yaml.YAMLError` for text that is not YAML."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: {len(text)} characters, more than the {MAX_CONFIG_BYTES} a config may have")
    loader = _BoundedLoader(text, what)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply; refused") from None
    finally:
        loader.dispose()


def check_image_size(nbytes: int | None, path: str) -> None:
    """`InputError` when an image file is larger than `MAX_IMAGE_BYTES` (checked before reading it)."""
    if nbytes is not None and nbytes > MAX_IMAGE_BYTES:
        raise InputError(f"{path}: image file too large ({nbytes} bytes, at most {MAX_IMAGE_BYTES}); refused")


def _read_header(member: IO[bytes], version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a `.npy` header (versions 1.0 and 2.0; 3.0 is 2.0 in UTF-8)."""
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"unknown .npy format version {version}")


def check_npy(f: IO[bytes], url: str) -> None:
    """Check a `.npy` file open as `f` before numpy allocates it: its header's declared size must be
    what the file holds. `InputError` naming the file otherwise; leaves `f` at its start."""
    try:
        start = f.tell()
        version = np.lib.format.read_magic(f)
        shape, _, dtype = _read_header(f, version)
        header = f.tell() - start
        size = f.seek(0, 2) - start
    except ValueError:
        f.seek(0)
        return  # not a .npy header: np.load names the problem
    f.seek(0)
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with its own message
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared != size - header:
        raise InputError(f"{url}: declares an array of shape {short(shape)} {dtype} ({declared} bytes) but holds "
                         f"{size - header} bytes; refused")


def check_npz(f: IO[bytes], url: str) -> None:
    """Check every entry of the `.npz` open as `f` before numpy allocates any, whatever its name (numpy
    reads an entry `x` as array `x` just as it reads `x.npy`, and hands out the raw bytes of one that is
    not an array): no entry may claim bytes past the end of the file, a large entry may not inflate more
    than `MAX_NPZ_RATIO` times, nor all entries together (entries may share their compressed bytes), and
    an array's header must declare exactly what its entry holds (shape × item size). `InputError`
    naming the file and the entry otherwise. Leaves `f` at its start."""
    try:
        size = f.seek(0, 2)
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_ENTRIES:
                raise InputError(f"{url}: {len(infos)} zip entries, more than the {MAX_NPZ_ENTRIES} an .npz may "
                                 "have; refused")
            total = sum(info.file_size for info in infos)
            if total > _RATIO_FROM and total > MAX_NPZ_RATIO * max(size, 1):
                raise InputError(f"{url}: its entries inflate from {size} to {total} bytes (a compression "
                                 "bomb?); refused")
            for info in infos:
                _check_npz_entry(zf, info, size, url)
    finally:
        f.seek(0)


def _check_npz_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, url: str) -> None:
    """One entry of `check_npz` (`size`: the whole file's bytes)."""
    name = short(info.filename, 80)
    if info.header_offset + info.compress_size > size:
        raise InputError(f"{url}: entry {name} claims {info.compress_size} compressed bytes past the end of "
                         "the file; refused")
    if info.file_size > _RATIO_FROM and info.file_size > MAX_NPZ_RATIO * max(info.compress_size, 1):
        raise InputError(f"{url}: entry {name} inflates from {info.compress_size} to "
                         f"{info.file_size} bytes (a compression bomb?); refused")
    with zf.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
        except ValueError:
            return  # not an array: numpy hands out its bytes, at most file_size (bounded above)
        shape, _, dtype = _read_header(member, version)
        header = member.tell()
    if dtype.hasobject:
        raise InputError(f"{url}: an array holds Python objects, refused (entry {name})")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared != info.file_size - header:
        raise InputError(f"{url}: entry {name} declares {short(shape)} {dtype} "
                         f"({declared} bytes) but holds {info.file_size - header}; refused")

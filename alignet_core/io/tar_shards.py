"""Webdataset-style tar shards as an image store: members addressed as `tar://<shard>::<member>`, each
shard's index read once per process, every member bounded before it is read (`limits`): label
members, long-name headers and sparse members are refused, and so are shards of too many members."""

from __future__ import annotations

import posixpath
import tarfile
import threading
from glob import has_magic
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import InputError
from alignet_core.io import limits


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would pass it back: plain for local files, with protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


TAR_PREFIX = "tar://"
LABEL_EXTENSIONS = ("cls", "txt")  # webdataset label members, first found wins
_TAR_INDEX: dict[str, tuple[tuple[Any, ...], dict[str, tarfile.TarInfo]]] = {}  # shard → (its state, index)
_TAR_LOCK = threading.Lock()


class _TarRefused(tarfile.TarError):
    """A tar member this reader will not read (the message says which and why)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """`tarfile.TarInfo` that refuses, before tarfile reads it, a header member (pax extended header, GNU
    long name or link) larger than `limits.MAX_TAR_HEADER_BYTES` (tarfile reads those whole), and any
    sparse member (its map is read entry by entry without a bound; image shards have none)."""

    _HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._HEADER_TYPES and self.size > limits.MAX_TAR_HEADER_BYTES:
            raise _TarRefused(f"a header member of {self.size} bytes (at most {limits.MAX_TAR_HEADER_BYTES})")
        return super()._proc_member(tf)

    def _refuse_sparse(self, *args: Any, **kwargs: Any) -> Any:
        raise _TarRefused("a sparse member (image shards hold plain files)")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def open_tar(f: Any) -> tarfile.TarFile:
    """A tar shard (plain or compressed) open for reading with bounded headers (`_BoundedTarInfo`)."""
    return tarfile.open(fileobj=f, mode="r:*", tarinfo=_BoundedTarInfo)


def tar_member_url(shard: str, member: str) -> str:
    """The reference of one member of a tar shard: fsspec's chained URL `tar://<member>::<shard>`."""
    return f"{TAR_PREFIX}{member}::{shard}"


def _split_tar_url(url: str) -> tuple[str, str]:
    """(shard url, member name) of a `tar://<member>::<shard>` reference."""
    member, sep, shard = url[len(TAR_PREFIX) :].partition("::")
    if not sep or not member or not shard:
        raise InputError(f"{url}: expected a tar member reference 'tar://<member>::<shard url>'")
    return shard, member


def _shard_state(shard: str) -> tuple[Any, ...]:
    """(size, mtime) of a shard as its filesystem reports it (None, None when it cannot be stat'ed)."""
    try:
        fs, path = fsspec.core.url_to_fs(shard)
        info = fs.info(path)
        return info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag"))
    except (FileNotFoundError, OSError):
        return None, None


def tar_index(shard: str, fresh: bool = False) -> dict[str, tarfile.TarInfo]:
    """member name → TarInfo of every regular file in a shard, read once per process and shard; with `fresh`
    (the listing) the shard is stat'ed first and indexed anew when rewritten since (another size or mtime)."""
    with _TAR_LOCK:
        cached = _TAR_INDEX.get(shard)
    state = _shard_state(shard) if fresh or cached is None else cached[0]
    if cached is not None and cached[0] == state:
        return cached[1]
    try:
        with fsspec.open(shard, "rb") as f, open_tar(f) as tf:
            index = {}
            for n, m in enumerate(tf, start=1):
                if n > limits.MAX_TAR_MEMBERS:
                    raise _TarRefused(f"more than {limits.MAX_TAR_MEMBERS} members (split it into smaller shards)")
                if m.isfile():
                    index[m.name] = m
    except FileNotFoundError:
        raise InputError(f"source.path: tar shard {shard!r} does not exist") from None
    except _TarRefused as err:
        raise InputError(f"source.path: tar shard {shard!r} has {err}; refused") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"source.path: {shard!r} is not a readable tar file: {err}") from None
    with _TAR_LOCK:
        _TAR_INDEX[shard] = (state, index)
    return index


def read_tar_member(url: str) -> bytes:
    """The bytes of the member a `tar://<member>::<shard>` reference names."""
    shard, member = _split_tar_url(url)
    info = tar_index(shard).get(member)
    if info is None:
        raise InputError(f"{url}: image file does not exist (no member {member!r} in tar shard {shard!r})")
    limits.check_image_size(info.size, url)
    with fsspec.open(shard, "rb") as f, open_tar(f) as tf:
        member_file = tf.extractfile(info)
        return member_file.read() if member_file is not None else b""


def expand_shards(urls_or_glob: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs, sorted: a glob ('shards/*.tar'), one URL, or a list of either."""
    patterns = [urls_or_glob] if isinstance(urls_or_glob, str) else list(urls_or_glob)
    shards: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        found = sorted(fs.glob(path)) if has_magic(path) else ([path] if fs.isfile(path) else [])
        if not found:
            raise InputError(f"source.path: no tar shard matches {pattern!r}")
        shards.extend(url_of(fs, p) for p in found)
    return list(dict.fromkeys(shards))


def shard_name(shard: str) -> str:
    base = posixpath.basename(shard.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base

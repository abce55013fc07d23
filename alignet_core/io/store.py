"""The artifact store: paths and fsspec helpers, content keys, stage directories, manifests,
atomic writes and publication.

Layout under the pipeline root (a local path or fsspec URL):

    <root>/stages/<stage>/<key>/manifest.json   written last; its presence means "complete"
    <root>/stages/<stage>/<key>/...             the stage's outputs (Zarr stores, files)

A content key is the hash of the stage's config, the keys of its inputs and the version of the
code that computes it (`alignet_core.runtime.code_version`), so a complete manifest under a key
can be reused as is. Embedding stores (Zarr) are in `alignet_core.io.embedding_store`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import InputError, StoreError
from alignet_core.io import limits

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Prefect's cache bookkeeping inside a stage directory (`tasks/_cache.py`): rewritten by the orchestrator
#: after the stage finished, so it is not one of the stage's files
GENERATION_FILE = "cache-generation.json"


# ----------------------------------------------------------------------------- paths
def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path) of a path or fsspec URL. A path without '://' is a local path taken
    literally: a '::' in a file name is part of the name, not fsspec's URL chaining."""
    if "://" not in url:
        fs = LocalFileSystem()
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url)


_fs = url_to_fs


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


def relative_to(url: str, base: str) -> str:
    """`url` written relative to the folder `base` (both on one file system, `url` under `base`'s
    root), e.g. `embeddings.zarr` or `../../embed/<key>/embeddings.zarr`: what a manifest stores so
    that a moved root still finds its files."""
    _, p_u = fsspec.core.split_protocol(url)
    _, p_b = fsspec.core.split_protocol(base)
    return posixpath.relpath(posixpath.normpath(p_u), posixpath.normpath(p_b))


def resolve_relative(base: str, rel: str) -> str:
    """The inverse of `relative_to`: `rel` joined to the folder `base`, '..' collapsed, the protocol kept."""
    protocol, p_b = fsspec.core.split_protocol(base)
    path = posixpath.normpath(posixpath.join(p_b, rel))
    return f"{protocol}://{path}" if protocol else path


def is_relative(path: str) -> bool:
    """True for a relative path (no protocol, no leading '/')."""
    return "://" not in path and not path.startswith("/")


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


def local_path(url: str) -> str:
    """The filesystem path of a local URL; `StoreError` for a remote one."""
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        raise StoreError(f"{url!r}: this operation needs a local path, got a {type(fs).__name__} URL")
    return path


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


# ----------------------------------------------------------------------------- durability
def fsync_dir(path: str) -> None:
    """Flush a local directory's entries (names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush a local file, or every file and folder under a local folder, to disk: called before the
    rename that publishes them, so after a power loss a manifest never outlives its data."""
    if not os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_tree(os.path.join(folder, name))
        fsync_dir(folder)


def replace_durably(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    """Rename the written temporary `tmp` to `path`. Locally the data is flushed to disk before the
    rename and the rename after it (`fsync_tree`, `fsync_dir`); object stores replace whole objects."""
    if isinstance(fs, LocalFileSystem):
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    else:
        fs.mv(tmp, path)


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
            fsync_dir(os.path.dirname(path) or ".")
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
        replace_durably(fs, tmp, path)
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
            limits.check_npy(f, url)
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


# ----------------------------------------------------------------------------- stage files
def _is_stage_file(rel: str) -> bool:
    """True for a file a stage made: not its manifest, the cache's generation file, a lock or a temporary."""
    if rel in (MANIFEST, GENERATION_FILE) or rel.endswith(".lock"):
        return False
    return not any(_TEMPORARY.search(part) for part in rel.split("/"))


def _file_sizes(dir_url: str) -> dict[str, int]:
    """Size of every stage file under a directory, by path relative to it: one listing (a walk of the
    folder locally, paginated listings on an object store), no file opened."""
    fs, path = _fs(dir_url)
    base = path.rstrip("/")
    if not fs.isdir(base):
        return {}
    out = {}
    for p, info in fs.find(base, detail=True).items():
        rel = posixpath.relpath(p, base) if isinstance(fs, LocalFileSystem) else p[len(base):].lstrip("/")
        if info.get("type") == "file" and _is_stage_file(rel):
            out[rel] = int(info["size"])
    return dict(sorted(out.items()))


def stage_files(dir_url: str) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size": bytes, "sha256": hex}}` of every file a stage wrote under its directory
    (Zarr chunks included; its manifest, lock files and temporaries left out), for `finish` to record so a
    reuse can notice a changed file (sizes) and `alignet verify --stages` a flipped bit (checksums).
    Each file is read once, in 1 MiB blocks."""
    return {rel: {"size": size, "sha256": file_sha256(join(dir_url, rel))}
            for rel, size in _file_sizes(dir_url).items()}


def stage_file_problems(dir_url: str, recorded: Any, checksums: bool) -> list[str]:
    """How the files under a stage directory differ from what its manifest recorded (`stage_files`):
    one line per problem (missing, another size, with `checksums` another sha256; an entry that is not a
    relative path inside the directory is reported and never read), empty when they match. Without
    `checksums` it costs one listing of the directory: what every reuse pays."""
    if not isinstance(recorded, dict):
        return [f"{MANIFEST}: its file list is not a mapping of paths to sizes and checksums"]
    sizes = _file_sizes(dir_url)
    problems = []
    for rel, info in sorted(recorded.items()):
        size = info.get("size") if isinstance(info, dict) else None
        if not (isinstance(rel, str) and is_relative(rel) and posixpath.normpath(rel).split("/")[0] != ".."):
            problems.append(f"{str(rel)[:200]}: points outside the stage directory; not read")
        elif not isinstance(size, int):
            problems.append(f"{rel}: the manifest records no size")
        elif rel not in sizes:
            problems.append(f"{rel}: missing")
        elif sizes[rel] != size:
            problems.append(f"{rel}: {sizes[rel]} bytes, the manifest recorded {size}")
        elif checksums and file_sha256(join(dir_url, rel)) != info.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def publish_dir(tmp_url: str, final_url: str) -> None:
    """Move a fully written directory into place by one rename (atomic on a local filesystem)."""
    fs, tmp = _fs(tmp_url)
    _, final = _fs(final_url)
    if fs.exists(final):
        raise StoreError(f"{final_url!r} already exists; refusing to overwrite a published artifact")
    fs.makedirs(os.path.dirname(final), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        fsync_tree(tmp)  # every file and folder on disk before the rename publishes them
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))
    else:
        fs.mv(tmp, final, recursive=True)



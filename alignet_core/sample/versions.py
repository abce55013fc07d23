"""Published dataset versions: `<root>/datasets/<name>/<version>/`, a `latest` pointer, retention.

A version is the content key of the sampling stage that made it, so regenerating with unchanged
inputs lands on the same version instead of publishing a duplicate. Each version directory is
published by one rename with its `manifest.json` (config, input keys, code version, counts,
sha256 per file); readers never see a partial version. `latest` is a small JSON file next to
the versions, replaced atomically. Everything goes through fsspec, so roots may be URLs.

Readers hold the version they read (`reading`: a shared `flock` on
`<root>/datasets/<name>/.readers/<version>.lock`); retention deletes a version only while it holds that
lock exclusively, and leaves a version a reader holds for the next retention. So `verify` never sees a
version vanish under it, and a reader that resolved a version just before retention removed it finds it
gone whole (and, for `latest`, resolves again) rather than half deleted. Object-store roots have no file
locks: there readers are not protected from a concurrent retention.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec

from alignet_core.errors import InputError, StoreError
from alignet_core.io import lock, store, version_locks

log = logging.getLogger(__name__)

LATEST = "latest"
PINS = ".pins"  # <root>/datasets/<name>/.pins/<version>.<id>: a run will promote that version
PIN_TTL_SECONDS = 7 * 24 * 3600  # a pin older than this (its run was killed) no longer holds retention off
# a version id (and a dataset name) is one plain folder name: no '/', no leading '.', so never '..'
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def checked_name(value: object, what: str) -> str:
    """`value` when it is one plain folder name; `InputError` naming `what` otherwise (a version or a
    dataset name can never lead out of the dataset's folder)."""
    if not isinstance(value, str) or not NAME.match(value):
        shown = repr(value)[:80]
        raise InputError(f"{what}: {shown} is not a plain folder name (letters, digits, '.', '_', '-'; "
                         "no '/', no leading '.'); refusing a path outside the dataset's folder")
    return value


def datasets_dir(root: str) -> str:
    return store.join(root, "datasets")


def version_dir(root: str, name: str, version: str) -> str:
    return store.join(root, "datasets", name, version)


def now_utc() -> str:
    """The publication timestamp format (ISO 8601, UTC, seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _children(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))


def list_datasets(root: str) -> list[str]:
    """Names of the datasets under root that have at least one published version."""
    return [n for n in _children(datasets_dir(root)) if not n.startswith(".") and list_versions(root, n)]


def list_versions(root: str, name: str) -> list[dict[str, Any]]:
    """Published versions of a dataset, oldest first: version, published_at, n_triplets, path,
    latest (bool). Directories without a manifest (being written, or debris) are not versions."""
    latest = read_latest(root, name)
    out = []
    for v in _children(store.join(datasets_dir(root), name)):
        url = version_dir(root, name, v)
        if v.startswith(".") or ".tmp-" in v or not store.is_complete(url):  # debris, or being written
            continue
        try:
            m = store.read_manifest(url)
        except (StoreError, FileNotFoundError):  # removed by retention since it was listed
            continue
        out.append({
            "version": v,
            "published_at": m.get("published_at", ""),
            "n_triplets": sum(int(f.get("n_triplets", 0)) for f in m.get("files", {}).values()),
            "files": len(m.get("files", {})),
            "path": url,
            "latest": v == latest,
        })
    return sorted(out, key=lambda r: (r["published_at"], r["version"]))


def read_latest(root: str, name: str) -> str | None:
    """The version `latest` points at, or None when nothing was published yet."""
    url = store.join(datasets_dir(root), checked_name(name, "dataset name"), LATEST)
    if not store.exists(url):
        return None
    try:
        return checked_name(store.read_json(url).get("version"), f"{url}: version")
    except (InputError, AttributeError) as err:
        raise StoreError(f"{url!r} does not name a version of this dataset ({err}); "
                         "point it at a published version or delete it") from None


def set_latest(root: str, name: str, version: str) -> None:
    """Point `latest` at a published version (one atomic replace)."""
    url = version_dir(root, name, version)
    if not (isinstance(version, str) and NAME.match(version)) or not store.is_complete(url):
        raise StoreError(f"{url!r} is not a published version (no manifest); `latest` left unchanged")
    store.write_json_atomic(store.join(datasets_dir(root), name, LATEST),
                            {"version": version, "path": url, "updated_at": now_utc()})


def resolve(root: str, name: str, version: str = LATEST) -> str:
    """A version id: `version` itself, or what `latest` points at. `InputError` if absent or not a
    plain version id (e.g. `../other`)."""
    checked_name(name, "dataset name")
    checked_name(version, "version")
    if version == LATEST:
        v = read_latest(root, name)
        if v is None:
            have = list_datasets(root)
            raise InputError(f"dataset {name!r} has no published version under {datasets_dir(root)!r}"
                             + (f" (datasets there: {have})" if have else ""))
        return v
    if not store.is_complete(version_dir(root, name, version)):
        have = [r["version"] for r in list_versions(root, name)]
        raise InputError(f"dataset {name!r} has no version {version!r}; versions: {have or 'none'}")
    return version


@contextlib.contextmanager
def reading(root: str, name: str, version: str = LATEST) -> Iterator[str]:
    """Hold a published version (`latest` by default) for reading; yields its id. Retention does not
    delete it until the block ends. A version removed between resolving it and taking the lock is
    resolved again when it was `latest` (which has moved on), and an `InputError` naming it otherwise."""
    with contextlib.ExitStack() as held:
        for _ in range(100):
            v = resolve(root, name, version)
            hold = held.enter_context(contextlib.ExitStack())
            hold.enter_context(version_locks.shared_hold(root, name, v))  # waits while retention deletes it
            if store.is_complete(version_dir(root, name, v)):
                break
            hold.close()
            if version != LATEST:
                raise InputError(f"dataset {name!r} version {v!r} was removed by retention (keep_versions) while "
                                 "it was being opened")
        else:
            raise StoreError(f"dataset {name!r}: `latest` kept pointing at versions that were removed; try again")
        yield v


def manifest(root: str, name: str, version: str = LATEST) -> dict[str, Any]:
    """The manifest of a version (`latest` by default), with its resolved `version` and `path`."""
    with reading(root, name, version) as v:
        url = version_dir(root, name, v)
        return {**store.read_manifest(url), "version": v, "path": url}


def verify(root: str, name: str, version: str = LATEST) -> list[str]:
    """Recompute the sha256 of every file a version's manifest lists; return the problems found
    (a missing file, a checksum that differs), empty when the version is intact. The version is held
    (`reading`) throughout, so retention cannot remove it meanwhile."""
    with reading(root, name, version) as v:
        url = version_dir(root, name, v)
        return _verify({**store.read_manifest(url), "path": url})


def _verify(m: dict[str, Any]) -> list[str]:
    problems = []
    for fname, info in sorted(m.get("files", {}).items()):
        rel = info.get("path", fname)
        url = store.join(m["path"], rel) if isinstance(rel, str) else ""
        if not (isinstance(rel, str) and store.is_relative(rel) and store.is_inside(url, m["path"])):
            problems.append(f"{str(rel)[:200]}: points outside the version folder; not read")
        elif not store.exists(url):
            problems.append(f"{info.get('path', fname)}: missing")
        elif store.file_sha256(url) != info["sha256"]:
            problems.append(f"{info.get('path', fname)}: sha256 differs from the manifest")
    return problems


def apply_retention(root: str, name: str, keep: int | None) -> list[str]:
    """Delete the oldest versions beyond the newest `keep` (None: keep all); the version `latest`
    points at, versions another run has pinned (`pin`) and versions a reader holds (`reading`) are
    never deleted (a held one is left for the next retention). Call it under `dataset_lock` (`promote`
    does). A version disappears by one rename before its files are removed, so readers see it whole or
    not at all. Returns the deleted version ids."""
    if keep is None:
        return []
    if keep < 1:
        raise InputError(f"keep_versions: expected at least 1, got {keep}")
    versions = list_versions(root, name)
    pinned = _pinned(root, name)
    doomed = [r for r in versions[: max(0, len(versions) - keep)] if not r["latest"] and r["version"] not in pinned]
    fs, _ = fsspec.core.url_to_fs(root)
    removed = []
    for r in doomed:
        lock_file = version_locks.reader_lock_path(root, name, r["version"])
        fd = version_locks.open_lock(lock_file)
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("retention: version %s of dataset %s is being read; left for the next retention",
                             r["version"], name)
                    continue
            _, path = fsspec.core.url_to_fs(r["path"])
            trash = f"{path.rstrip('/').rsplit('/', 1)[0]}/.trash-{uuid.uuid4().hex}"
            fs.mv(path, trash, recursive=True)
            fs.rm(trash, recursive=True)
            if lock_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lock_file)  # a reader that opened it meanwhile finds the version gone
            removed.append(r["version"])
            log.info("retention: removed version %s of dataset %s", r["version"], name)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def dataset_lock(root: str, name: str, timeout: float | None = None):  # noqa: ANN201 - a context manager
    """The lock of a dataset's `latest` and retention: `<root>/datasets/<name>.lock` (see `io.lock`)."""
    return lock.stage_lock(store.join(datasets_dir(root), checked_name(name, "dataset name")), timeout)


def pin(root: str, name: str, version: str) -> str:
    """Keep `version` from retention until `unpin`: a run pins the version it is about to publish or
    reuse (when it plans sampling) and unpins it once it is `latest`. Returns the pin's id."""
    pin_id = f"{checked_name(version, 'version')}.{uuid.uuid4().hex}"
    with dataset_lock(root, name):
        store.write_json_atomic(store.join(datasets_dir(root), name, PINS, pin_id), {"pinned_at": time.time()})
    return pin_id


def _pinned(root: str, name: str) -> set[str]:
    """Versions some run has pinned (pins older than `PIN_TTL_SECONDS` ignored)."""
    url = store.join(datasets_dir(root), name, PINS)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return set()
    out = set()
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if ".tmp-" in base:
            continue
        try:
            fresh = time.time() - json.loads(fs.cat_file(p))["pinned_at"] < PIN_TTL_SECONDS
        except (ValueError, KeyError, TypeError, OSError):
            fresh = False
        if fresh:
            out.add(base.rsplit(".", 1)[0])
    return out


def promote(root: str, name: str, version: str, keep: int | None, pin_id: str | None = None,
            timeout: float | None = None) -> list[str]:
    """Under the dataset's lock: point `latest` at `version`, drop this run's pin, apply retention
    (which never deletes a version another run has pinned). Returns the deleted version ids."""
    with dataset_lock(root, name, timeout):
        set_latest(root, name, version)
        if pin_id is not None:
            store.remove(store.join(datasets_dir(root), name, PINS, checked_name(pin_id, "pin")))
        return apply_retention(root, name, keep)

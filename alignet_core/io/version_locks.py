"""Reader locks on published dataset versions: a reader holds a shared `flock` on
`<root>/datasets/<name>/.readers/<version>.lock` while it reads a version; retention deletes a version only
while it holds that lock exclusively (`sample.versions.apply_retention`). Here, below the stages, so that
the sample stage (which publishes and retains) and the distill stage (which reads) share one lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from alignet_core.io import store

READERS = ".readers"  # <root>/datasets/<name>/.readers/<version>.lock: shared by readers, exclusive to delete


def reader_lock_path(root: str, name: str, version: str) -> str | None:
    """The reader lock file of a version, or None for a non-local root (no file locks there)."""
    fs, path = fsspec.core.url_to_fs(store.join(root, "datasets", name, READERS, f"{version}.lock"))
    return path if isinstance(fs, LocalFileSystem) else None


def open_lock(path: str | None) -> int | None:
    """A file descriptor on a lock file, created if need be; None where there is none to take: a non-local
    root, or a dataset folder this user may not write (a read-only reader, then not protected)."""
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None


@contextlib.contextmanager
def shared_hold(root: str, name: str, version: str) -> Iterator[None]:
    """Hold `version` of dataset `name` for reading (waits while retention deletes it): retention leaves it
    until the block ends. The caller checks that the version is still complete once inside."""
    fd = open_lock(reader_lock_path(root, name, version))
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops the shared lock

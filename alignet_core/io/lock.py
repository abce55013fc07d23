"""One writer per stage output: an exclusive file lock beside each stage directory.

Two runs on the same artifact root that reach the same stage (same content key) would otherwise
write the same chunks, shards and manifest at once. Every stage writer holds
`<root>/stages/<stage>/<key>.lock` while it works: a second run waits for the first (and then
finds its complete manifest and reuses it) or, with a timeout, fails with a `StoreError` naming
the directory and the lock file.

The lock is an OS file lock (`flock`, through the `filelock` package): the kernel drops it when its
holder dies, even by SIGKILL, so a killed run never leaves a stale lock behind. Object stores
(s3://, gs://, ...) have no file locks; there the stages rely on what they already guarantee
(whole-object writes, manifests written last) and a warning says that concurrent writers are not
excluded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import fsspec
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import StoreError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


def lock_path(dir_url: str) -> str | None:
    """The lock file of a stage directory (`<dir>.lock`), or None for a non-local URL."""
    fs, path = fsspec.core.url_to_fs(dir_url)
    if not isinstance(fs, LocalFileSystem):
        return None
    return path.rstrip("/") + LOCK_SUFFIX


@contextlib.contextmanager
def stage_lock(dir_url: str, timeout: float | None) -> Iterator[None]:
    """Hold the exclusive writer lock of a stage directory for the duration of the block.

    timeout: seconds to wait for another holder; None waits as long as it takes, 0 fails at once.
    Raises `StoreError` naming the directory and lock file when the wait times out.
    """
    path = lock_path(dir_url)
    if path is None:
        log.warning("%s: not a local path, so concurrent runs on it are not excluded by a lock", dir_url)
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if timeout == 0:
            raise _busy(dir_url, path, timeout) from None
        log.info("%s is being written by another run; waiting for it (lock %s)", dir_url, path)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise _busy(dir_url, path, timeout) from None
    try:
        yield
    finally:
        lock.release()


def _busy(dir_url: str, path: str, timeout: float | None) -> StoreError:
    return StoreError(
        f"{dir_url!r} is being written by another run on the same root (lock {path!r} is held); "
        f"gave up after lock_timeout = {timeout} s. Let that run finish (this one then reuses its output), "
        "or raise lock_timeout (null waits as long as it takes)"
    )

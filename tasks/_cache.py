"""Prefect caching keyed on a stage's content key, never pointing at missing files.

A task's cache key is the content key of the stage it runs (the same key that names its output
directory). When that directory is not complete (deleted, or a killed run), the task is called
with `refresh_cache=True`, so Prefect reruns it and overwrites the stale record instead of
returning a result whose files are gone.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prefect import Task

R = TypeVar("R")


def cached_call(task: Task[..., R], key: str, complete: bool, *args: Any, **kwargs: Any) -> R:
    """Run `task` with cache key `key`; refresh the cache unless the output is `complete`."""
    return task.with_options(cache_key_fn=lambda *_: key, refresh_cache=not complete)(*args, **kwargs)


def cached_submit(task: Task[..., R], key: str, complete: bool, *args: Any, **kwargs: Any) -> Any:
    """As `cached_call`, but submitted to the flow's task runner (returns a future)."""
    return task.with_options(cache_key_fn=lambda *_: key, refresh_cache=not complete).submit(*args, **kwargs)

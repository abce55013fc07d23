"""Prefect's cache keyed on a stage's content key and root, and a hit only when it tells the truth.

`StageCache(locate=...)` is the cache policy on every stage task's decorator. `locate(**task
inputs)` gives the stage's content key (the key that names its output directory), that directory,
whether the task's output is complete on disk, and `expected`: what the task returns when it reuses
that output (for a stage: `runner.reuse`, the manifest check). The cache key is the content key, a
hash of the directory's resolved path (so a moved or re-pointed root never hits a record naming the
old place) and the directory's *generation*: the id of the flow run that made the output, kept in
`<dir>/cache-generation.json`.

- Output complete: the generation file names the run that made it, so a rerun finds that run's
  record and is a cache hit.
- Output incomplete (never made, deleted, its manifest removed, or cut by a kill): the generation is
  this flow run's id, written to the file, so no earlier record can match; the task runs (the
  library resumes or reuses what it finds) and its result is recorded under the key the next run
  will compute. This is the refresh-when-incomplete rule, kept without per-call options.

A hit goes through the same check as a reuse: before Prefect reads the record at the key, its raw
bytes are parsed as plain JSON (nothing is unpickled or imported) and it is trusted only when its
serializer is exactly the JSON serializer the stage tasks write with (`RESULT_SERIALIZER`) and its
value equals `expected()`. Any other record (a pickle, another serializer, a stale or edited value)
is never handed to Prefect: the generation is refreshed so the key moves past it and the task runs.

An `AlignetError` met while computing the key (a stage file of another size: the reuse's check; an input
the plan reads) gives no key: the task's body plans and reuses the same way, so it fails with that error,
once (stage tasks do not retry a user error: `tasks._retry`), instead of Prefect logging it with a
traceback as a failed cache key and then running the body anyway.

Every task of one flow run on one directory (the shards and the publication of the sample stage)
shares the generation, so their keys agree within the run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.results import get_default_result_storage
from prefect.serializers import JSONSerializer

from alignet_core.errors import AlignetError
from alignet_core.io import store
from alignet_core.runtime.runner import StageOutput, StagePlan, reuse

GENERATION_FILE = store.GENERATION_FILE  # not one of the stage's files: finish records none of it
RESULT_SERIALIZER = "json"  # every stage task's `result_serializer`: records are JSON, never pickles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    """Where a task's output is: the stage's content key, its directory, whether it is complete, and
    `expected()`: the value the task returns when it reuses that output (None when it cannot)."""

    key: str
    dir: str
    complete: bool
    expected: Callable[[], Any] = field(default=lambda: None, compare=False)


def generation(dir_url: str, complete: bool, flow_run_id: str) -> str:
    """The generation of a stage directory: the flow run named in its generation file when the
    output is complete and the file exists, else `flow_run_id` (written to the file)."""
    url = store.join(dir_url, GENERATION_FILE)
    if complete and store.exists(url):
        return str(store.read_json(url)["flow_run"])
    if not (store.exists(url) and store.read_json(url).get("flow_run") == flow_run_id):
        store.write_json_atomic(url, {"flow_run": flow_run_id})
    return flow_run_id


def place(dir_url: str) -> str:
    """A short hash of where `dir_url` really is (a local path resolved through symlinks, '..' and
    the working directory; a URL as written)."""
    try:
        where = os.path.realpath(store.local_path(dir_url))
    except Exception:  # noqa: BLE001 - a remote URL is its own identity
        where = dir_url
    return hashlib.sha256(where.encode()).hexdigest()[:12]


def _record_bytes(task_ctx: TaskRunContext, key: str) -> bytes | None:
    """The raw bytes of the result record stored under `key`, or None when there is none."""
    storage = task_ctx.result_store.result_storage or get_default_result_storage(_sync=True)
    try:
        data = call_explicitly_sync_block_method(storage, "read_path", (key,), {})
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, bytes) else None


_SERIALIZER = JSONSerializer()


def trusted(record: bytes, expected: Any) -> bool:
    """True when `record` (a Prefect result record's raw bytes) holds exactly `expected`, written by
    the plain JSON serializer. Parses with `json` only: nothing is unpickled, imported or called."""
    if expected is None:
        return False
    try:
        doc = json.loads(record)
        meta, payload = doc["metadata"], doc["result"]
        if meta.get("serializer") != _SERIALIZER.model_dump(mode="json"):
            return False
        return isinstance(payload, str) and json.loads(payload) == json.loads(_SERIALIZER.dumps(expected))
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


@dataclass
class StageCache(CachePolicy):
    """Cache key = the stage's content key, where its directory is and the output's generation;
    a record at that key is a hit only when `trusted` (see the module doc).

    locate: called with the task's inputs that it names as parameters.
    """

    locate: Callable[..., Located] = field(kw_only=True)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if task_ctx.result_store.metadata_storage is not None:
            log.warning("result metadata storage is set: stage results are not cached (their records "
                        "could not be checked before Prefect reads them)")
            return None
        try:
            return self._key(task_ctx, inputs)
        except AlignetError as err:
            # The task's body plans and reuses the same way, so it raises this error as the task's failure: one
            # line in the CLI, not retried (`tasks._retry`). Raised here, Prefect would log it with a traceback
            # as a failed cache key, then run the body anyway.
            log.debug("%s: no cache key: %s", task_ctx.task.name, err)
            return None

    def _key(self, task_ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
        """The cache key (module doc); `StoreError` etc. from `locate` or the reuse check pass through."""
        wanted = inspect.signature(self.locate).parameters
        where = self.locate(**{name: inputs[name] for name in wanted if name in inputs})
        run = str(task_ctx.task_run.flow_run_id or task_ctx.task_run.id)
        base = f"{where.key}-{place(where.dir)}"
        key = f"{base}-{generation(where.dir, where.complete, run)}"
        record = _record_bytes(task_ctx, key)
        if record is None or trusted(record, where.expected() if where.complete else None):
            return key
        log.warning("%s: the cached result %s does not match the output on disk; recomputing", where.dir, key)
        key = f"{base}-{generation(where.dir, False, run)}"
        if _record_bytes(task_ctx, key) is not None:
            raise RuntimeError(f"an untrusted Prefect result record is stored under {key!r}; delete it")
        return key


def stage_output(plan: Callable[..., StagePlan], output_type: type[StageOutput]) -> Callable[..., Located]:
    """`locate` for a stage task whose first parameter is the run context (`ctx`) and whose others are
    `plan`'s after the config: `ctx.plan(plan, ...)` keys it (the run's one plan of the stage, which its run
    uses too). Complete when its directory has a manifest; `expected` is the manifest-checked reuse of that
    output."""

    def locate(ctx: Any, *args: Any, **kwargs: Any) -> Located:
        p = ctx.plan(plan, *args, *kwargs.values())
        return Located(key=p.key, dir=p.dir, complete=store.is_complete(p.dir),
                       expected=lambda: reuse(p, output_type))

    sig = inspect.signature(plan)
    params = list(sig.parameters.values())
    params[0] = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    locate.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return locate

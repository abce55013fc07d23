"""Prefect's cache keyed on a stage's content key, never pointing at missing files.

`StageCache(locate=...)` is the cache policy on every stage task's decorator. `locate(**task
inputs)` gives the stage's content key (the key that names its output directory), that directory,
and whether the task's output is complete on disk. The cache key is the content key plus the
directory's *generation*: the id of the flow run that made the output, kept in
`<dir>/cache-generation.json`.

- Output complete: the generation file names the run that made it, so a rerun finds that run's
  record and is a cache hit.
- Output incomplete (never made, deleted, its manifest removed, or cut by a kill): the generation is
  this flow run's id, written to the file, so no earlier record can match; the task runs (the
  library resumes or reuses what it finds) and its result is recorded under the key the next run
  will compute. This is the refresh-when-incomplete rule, kept without per-call options.

Every task of one flow run on one directory (the shards and the publication of the sample stage)
shares the generation, so their keys agree within the run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from alignet_core.io import store
from alignet_core.pipeline.runner import StagePlan

GENERATION_FILE = "cache-generation.json"


@dataclass(frozen=True)
class Located:
    """Where a task's output is: the stage's content key, its directory, whether it is complete."""

    key: str
    dir: str
    complete: bool


def generation(dir_url: str, complete: bool, flow_run_id: str) -> str:
    """The generation of a stage directory: the flow run named in its generation file when the
    output is complete and the file exists, else `flow_run_id` (written to the file)."""
    url = store.join(dir_url, GENERATION_FILE)
    if complete and store.exists(url):
        return str(store.read_json(url)["flow_run"])
    if not (store.exists(url) and store.read_json(url).get("flow_run") == flow_run_id):
        store.write_json_atomic(url, {"flow_run": flow_run_id})
    return flow_run_id


@dataclass
class StageCache(CachePolicy):
    """Cache key = the stage's content key and the output's generation (see the module doc).

    locate: called with the task's inputs that it names as parameters.
    """

    locate: Callable[..., Located] = field(kw_only=True)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        wanted = inspect.signature(self.locate).parameters
        where = self.locate(**{name: inputs[name] for name in wanted if name in inputs})
        run = task_ctx.task_run.flow_run_id
        return f"{where.key}-{generation(where.dir, where.complete, str(run or task_ctx.task_run.id))}"


def stage_output(plan: Callable[..., StagePlan]) -> Callable[..., Located]:
    """`locate` for a stage planned by `plan`: complete when its directory has a manifest."""

    def locate(*args: Any, **kwargs: Any) -> Located:
        p = plan(*args, **kwargs)
        return Located(key=p.key, dir=p.dir, complete=store.is_complete(p.dir))

    locate.__signature__ = inspect.signature(plan)  # type: ignore[attr-defined]
    return locate

"""The stage runner: plan a stage's key and directory, reuse a complete output, or make it once.

Every stage writes under `<root>/stages/<stage>/<key>/`, where the key hashes the stage's config
section, the keys of its inputs and its code version (`code_version`: the source of every
`alignet_core` module its `stage.py` imports, transitively, and its numeric libraries' versions).
The manifest is written last (`finish`), so a directory without one is never trusted and the stage
reruns, resuming from whatever chunks or shards it had finished. A stage's work runs while its run
holds the directory's writer lock (`once`); a run that waited for another reuses what that one made.

Each stage package defines its metrics (a `StageMetrics` model) and its output (a `StageOutput`
whose `metrics` field has that type); manifests hold the metrics as JSON and `reuse` validates
them back into the stage's own types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from alignet_core.errors import StoreError
from alignet_core.io import lock, store
from alignet_core.io.redact import redact
from alignet_core.records import Record
from alignet_core.runtime.code_version import code_version

log = logging.getLogger(__name__)


class StagePlan(Record):
    """Where a stage's outputs live, under which content key, made by which code version."""

    stage: str
    key: str
    dir: str
    code_version: str


class StageMetrics(BaseModel):
    """The headline numbers of a stage (each stage subclasses it); `seconds` is its wall time."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seconds: float


class StageOutput(Record):
    """What a stage hands to the next: its key, directory, main artifact and metrics."""

    stage: str
    key: str
    dir: str
    artifact: str  # the main output: a store, a dataset folder, a checkpoint folder
    metrics: StageMetrics


Output = TypeVar("Output", bound=StageOutput)

RELOCATABLE = "artifact_relative_to_stage_dir"  # manifest flag: `artifact` is relative to the stage directory


def plan_stage(root: str, stage: str, config: Any, inputs: Sequence[str], module: str) -> StagePlan:
    """The plan of `stage` whose code is the module `module` (its `stage.py`, by dotted name):
    key = hash(stage, config (JSON-able), input keys, code version of `module`)."""
    code = code_version(module)
    key = store.content_key(stage, config, list(inputs), code)
    return StagePlan(stage=stage, key=key, dir=store.stage_dir(root, stage, key), code_version=code)


def finish(
    plan: StagePlan, output_type: type[Output], artifact: str, metrics: StageMetrics, config: Any, inputs: Sequence[str]
) -> Output:
    """Write the stage's manifest (last: it marks the directory complete) and return its output. The
    manifest names the artifact relative to the stage directory, so a moved root reuses it."""
    relocatable = store.is_inside(artifact, stage_root(plan))
    stored = store.relative_to(artifact, plan.dir) if relocatable else artifact
    if relocatable:  # the path a reuse resolves, so a first run and a reuse hand on the same output
        artifact = store.resolve_relative(plan.dir, stored)
    out = output_type(stage=plan.stage, key=plan.key, dir=plan.dir, artifact=artifact, metrics=metrics)
    recorded = metrics.model_dump(mode="json")
    if relocatable:  # paths under the root in the metrics (a dataset, a published version) move with it
        recorded = _rooted(recorded, stage_root(plan), to_token=True)
    store.write_manifest(plan.dir, {"stage": plan.stage, "key": plan.key, "code_version": plan.code_version,
                                    "config": redact(config), "inputs": list(inputs), "artifact": stored,
                                    RELOCATABLE: relocatable, "metrics": recorded})
    return out


ROOT_TOKEN = "<root>"  # a manifest's metrics name paths under the artifact root as "<root>/..."


def _rooted(obj: Any, root: str, to_token: bool) -> Any:
    """`obj` (JSON) with every string path under `root` written as ROOT_TOKEN + the rest (`to_token`), or
    every ROOT_TOKEN path read back under `root`."""
    root = root.rstrip("/")
    if isinstance(obj, dict):
        return {k: _rooted(v, root, to_token) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rooted(v, root, to_token) for v in obj]
    if isinstance(obj, str):
        old, new = (root, ROOT_TOKEN) if to_token else (ROOT_TOKEN, root)
        if obj == old or obj.startswith(old + "/"):
            return new + obj[len(old):]
    return obj


def stage_root(plan: StagePlan) -> str:
    """The artifact root a stage directory `<root>/stages/<stage>/<key>` lies in."""
    return plan.dir.rstrip("/").rsplit("/", 3)[0]


def reuse(plan: StagePlan, output_type: type[Output]) -> Output | None:
    """The output of a complete stage directory, or None. A manifest is trusted only when it names this
    stage and key and an artifact inside the artifact root (`StoreError` otherwise): a copied or edited
    manifest can never point a run at files elsewhere. A relative artifact (what `finish` writes) is
    resolved against the stage directory, so a moved root is reused as it is."""
    if not store.is_complete(plan.dir):
        return None
    m = store.read_manifest(plan.dir)
    root = stage_root(plan)
    artifact = m.get("artifact")
    if m.get(RELOCATABLE) and isinstance(artifact, str) and artifact and store.is_relative(artifact):
        artifact = store.resolve_relative(plan.dir, artifact)
    if m.get("stage") != plan.stage or m.get("key") != plan.key or not store.is_inside(artifact, root):
        raise StoreError(
            f"{store.join(plan.dir, store.MANIFEST)}: names stage {m.get('stage')!r}, key {m.get('key')!r} and "
            f"artifact {m.get('artifact')!r}; expected stage {plan.stage!r}, key {plan.key!r} and an artifact "
            f"inside the root {root!r}. Delete {plan.dir!r} to recompute it"
        )
    log.info("%s: reusing complete output %s", plan.stage, plan.dir)
    metrics = _rooted(m["metrics"], root, to_token=False) if m.get(RELOCATABLE) else m["metrics"]
    return output_type.model_validate({"stage": plan.stage, "key": plan.key, "dir": plan.dir,
                                       "artifact": artifact, "metrics": metrics})


def once(
    plan: StagePlan,
    output_type: type[Output],
    work: Callable[[], Output],
    lock_timeout: float | None,
    clean: bool = True,
) -> Output:
    """A stage's output: reused when its directory is complete, else made by `work()` while this
    run holds the stage's writer lock (a run that waited for another reuses what that one made).
    Disk-full errors become a `StoreError`; with `clean`, temporaries of a killed writer go first."""
    if (done := reuse(plan, output_type)) is not None:
        return done
    with lock.stage_lock(plan.dir, lock_timeout), store.disk_full_as_store_error(plan.dir):
        if (done := reuse(plan, output_type)) is not None:  # another run finished it while this one waited
            return done
        if clean:
            store.remove_temporaries(plan.dir)
        return work()

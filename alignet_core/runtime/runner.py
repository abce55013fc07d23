"""The stage runner: plan a stage's key and directory, reuse a complete output, or make it once.

Every stage writes under `<root>/stages/<stage>/<key>/`, where the key hashes the stage's config
section, the keys of its inputs and its code version (`code_version`: the source of every
`alignet_core` module its `stage.py` imports, transitively, and its numeric libraries' versions).
The manifest is written last (`finish`), so a directory without one is never trusted and the stage
reruns, resuming from whatever chunks or shards it had finished. It records every file the stage wrote
(`STAGE_FILES`: size and sha256): each reuse compares the sizes (one listing of the directory, so a
truncated, extended or deleted file is a `StoreError` instead of wrong numbers downstream) and
`alignet verify --stages` the checksums (a flipped bit, which a size check cannot see; hashing on every
reuse would read gigabytes each rerun). A stage's work runs while its run
holds the directory's writer lock (`once`); a run that waited for another reuses what that one made.

Each stage package defines its metrics (a `StageMetrics` model) and its output (a `StageOutput`
whose `metrics` field has that type); manifests hold the metrics as JSON and `reuse` validates
them back into the stage's own types.
"""

from __future__ import annotations

import logging
import time
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
STAGE_FILES = "stage_files"  # manifest field: {path relative to the stage directory: {size, sha256}}


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
    t0 = time.perf_counter()
    files = store.stage_files(plan.dir)
    log.debug("%s: %d files hashed for the manifest in %.2f s", plan.stage, len(files), time.perf_counter() - t0)
    store.write_manifest(plan.dir, {"stage": plan.stage, "key": plan.key, "code_version": plan.code_version,
                                    "config": redact(config), "inputs": list(inputs), "artifact": stored,
                                    RELOCATABLE: relocatable, "metrics": recorded, STAGE_FILES: files})
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
    resolved against the stage directory, so a moved root is reused as it is.

    The files the manifest records must all be there with their recorded sizes (`StoreError` naming the
    first that is not). Only sizes: a byte changed in place is found by `alignet verify --stages`, which
    re-hashes them. A manifest that records no files (written before they were recorded) is reused."""
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
    if STAGE_FILES in m and (problems := store.stage_file_problems(plan.dir, m[STAGE_FILES], checksums=False)):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(
            f"{plan.stage} stage {plan.dir!r} changed since it finished: {problems[0]}{more}. Delete {plan.dir!r} "
            "to recompute it (`alignet verify --stages` checks every stage)"
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


class StageCheck(Record):
    """What `verify_stages` found in one complete stage directory: how many recorded files it re-hashed
    (None when its manifest records none: written before files were recorded) and the problems."""

    dir: str
    files: int | None
    problems: list[str]


def verify_stages(root: str) -> list[StageCheck]:
    """Re-hash every file that the manifest of each complete stage directory under `root`
    (`<root>/stages/<stage>/<key>/`, every stage and key) records, against its recorded sha256: what
    `alignet verify --stages` runs. Reads every byte of every stage, so it costs what `finish` paid."""
    fs, path = store.url_to_fs(store.join(root, "stages"))
    checks = []
    for stage in sorted(fs.ls(path, detail=False) if fs.isdir(path) else []):
        for key_dir in sorted(fs.ls(stage, detail=False) if fs.isdir(stage) else []):
            stage_name, key = stage.rstrip("/").rsplit("/", 1)[-1], key_dir.rstrip("/").rsplit("/", 1)[-1]
            dir_url = store.stage_dir(root, stage_name, key)
            if not fs.isdir(key_dir) or not store.is_complete(dir_url):
                continue
            checks.append(_verify_stage(dir_url, stage_name, key))
    return checks


def _verify_stage(dir_url: str, stage: str, key: str) -> StageCheck:
    try:
        m = store.read_manifest(dir_url)
    except StoreError as err:
        return StageCheck(dir=dir_url, files=None, problems=[str(err)])
    if not isinstance(m, dict) or m.get("stage") != stage or m.get("key") != key:
        return StageCheck(dir=dir_url, files=None, problems=[f"{store.MANIFEST}: names another stage or key"])
    if STAGE_FILES not in m:
        return StageCheck(dir=dir_url, files=None, problems=[])
    recorded = m[STAGE_FILES]
    problems = store.stage_file_problems(dir_url, recorded, checksums=True)
    return StageCheck(dir=dir_url, files=len(recorded) if isinstance(recorded, dict) else 0, problems=problems)

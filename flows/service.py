"""Operating `make serve` (scripts/serve.sh): this project's deployments as deployments/prefect.yaml declares
them, and closing the runs a stopped service leaves open.

A run in Running, Pending or Cancelling holds its deployment's concurrency slot until it leaves those
states. When the service stops (Ctrl-C, SIGTERM) or died (SIGKILL, a reboot), nothing else will ever move
those runs on: the next run of the deployment would wait for the slot forever. `close_open_runs` ends
every process of such a run that is still alive (found by the run id Prefect puts in the environment of
the engine and of everything it starts) and marks the run Crashed with the reason, which frees the slot.
`serve.sh` calls it when it stops (with its worker frozen) and when it starts (before its worker).

    python -m flows.service close --reason stopped     # or: --reason restarted
    python -m flows.service deployed                   # exit 0: every deployment is on the server as declared
    python -m flows.service record                     # after `prefect deploy`: what it stored, for `deployed`
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from alignet_core.runtime.lifeline import reap

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: this project's deployments
SPEC = REPO / "deployments" / "prefect.yaml"
#: the work pool `make serve` creates and its worker polls
POOL = "alignet-process"
#: the states that hold a deployment's concurrency slot
OPEN_STATES = ("RUNNING", "PENDING", "CANCELLING")
#: every field of a deployment that decides what its runs run: `deployed` compares them with what `prefect
#: deploy` stored (`record`), so a change through the API (a pull step, a parameter schema no longer
#: enforced, a default config) is undone by the next start of the service
RECORDED = ("entrypoint", "pull_steps", "job_variables", "work_pool_name", "work_queue_name", "parameters",
            "parameter_openapi_schema", "enforce_parameter_schema", "path", "storage_document_id",
            "infrastructure_document_id", "concurrency_limit", "concurrency_options")
#: the record, in the (private) Prefect home
RECORD = "deployed.json"
REASONS = {
    "stopped": "the service (scripts/serve.sh) was stopped while this run was in flight; its processes were "
               "ended. Run the deployment again: finished stages are reused.",
    "restarted": "orphaned: the service (scripts/serve.sh) stopped while this run was in flight and found it "
                 "still open when it restarted; its processes were ended. Run the deployment again: finished "
                 "stages are reused.",
}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of deployments/prefect.yaml as the server should hold it after `prefect deploy`."""

    name: str
    entrypoint: str
    pull_steps: list[dict[str, Any]]
    job_variables: dict[str, Any]
    work_pool: str


def project_deployments(spec: Path = SPEC, workdir: Path = REPO) -> dict[str, DeploymentSpec]:
    """deployment name → its spec, from `spec`, with `{{ $PWD }}` in the pull steps rendered as `workdir`
    (serve.sh deploys from the repository root)."""
    doc = yaml.safe_load(spec.read_text())
    pull = yaml.safe_load(yaml.safe_dump(doc.get("pull") or []).replace("{{ $PWD }}", str(workdir)))
    out = {}
    for d in doc["deployments"]:
        pool = d.get("work_pool") or {}
        out[d["name"]] = DeploymentSpec(name=d["name"], entrypoint=d["entrypoint"], pull_steps=d.get("pull", pull),
                                        job_variables=pool.get("job_variables") or {}, work_pool=pool.get("name"))
    return out


def same_pull_steps(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Equal, with working directories compared as the folders they resolve to."""
    def norm(steps: list[dict[str, Any]]) -> list[Any]:
        out = []
        for step in steps:
            for key, kwargs in step.items():
                kwargs = dict(kwargs or {})
                if key.endswith("set_working_directory") and isinstance(kwargs.get("directory"), str):
                    kwargs["directory"] = str(Path(kwargs["directory"]).resolve())
                out.append((key, sorted(kwargs.items())))
        return out
    return norm(got) == norm(want)


def run_processes(run_id: str) -> list[psutil.Process]:
    """This user's processes of flow run `run_id`: its engine and every process the engine started (they
    inherit `PREFECT__FLOW_RUN_ID`), wherever they were re-parented."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def open_runs(client: Any, specs: dict[str, DeploymentSpec]) -> list[Any]:
    """Runs of this project's deployments on `POOL` in a state that holds a concurrency slot."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(s) for s in OPEN_STATES]))),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])))
    deployments: dict[Any, Any] = {}
    out = []
    for run in runs:
        if run.deployment_id is None:
            continue
        if run.deployment_id not in deployments:
            deployments[run.deployment_id] = client.read_deployment(run.deployment_id)
        dep = deployments[run.deployment_id]
        spec = specs.get(dep.name)
        if spec is not None and dep.entrypoint == spec.entrypoint:
            out.append(run)
    return out


def close_open_runs(client: Any, reason: str, specs: dict[str, DeploymentSpec] | None = None) -> list[str]:
    """End the processes of every open run of this project's deployments and mark each run Crashed with
    `REASONS[reason]` (forced: a run left in Cancelling cannot leave it otherwise). Returns one line per run."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    lines = []
    for run in open_runs(client, specs or project_deployments()):
        procs = run_processes(str(run.id))
        tree = {p.pid: p for proc in procs for p in [proc, *_children(proc)]}
        reap(list(tree.values()))
        state = client.read_flow_run(run.id).state
        # still open, or crashed by the engine on our SIGTERM ("aborted by a termination signal"): say why
        if state is None or state.type in {StateType(s) for s in (*OPEN_STATES, "CRASHED")}:
            client.set_flow_run_state(run.id, Crashed(message=REASONS[reason]), force=True)
            lines.append(f"run {run.name} ({run.id}): {len(tree)} process(es) ended; marked Crashed ({reason})")
        else:
            lines.append(f"run {run.name} ({run.id}): {len(tree)} process(es) ended; it finished {state.name}")
    return lines


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def held_deployments(client: Any, specs: dict[str, DeploymentSpec]) -> dict[str, dict[str, Any]]:
    """name → the `RECORDED` fields (JSON) of each of this project's deployments the server holds on `POOL`."""
    held = {}
    for d in client.read_deployments():
        if d.name in specs and d.work_pool_name == POOL:
            dumped = d.model_dump(mode="json")
            held[d.name] = {field: dumped.get(field) for field in RECORDED}
    return held


def stale_deployments(client: Any, specs: dict[str, DeploymentSpec] | None = None,
                      record: dict[str, Any] | None = None) -> list[str]:
    """The names of this project's deployments the server lacks, holds differently from deployments/prefect.yaml
    (entrypoint, pull steps, job variables, pool, parameter schema enforced), or holds differently in any
    `RECORDED` field from `record` (what `prefect deploy` stored; None: every deployment is stale)."""
    specs = specs or project_deployments()
    held = held_deployments(client, specs)
    record = record or {}
    return sorted(name for name, spec in specs.items()
                  if name not in held or held[name]["entrypoint"] != spec.entrypoint
                  or not same_pull_steps(held[name]["pull_steps"] or [], spec.pull_steps)
                  or (held[name]["job_variables"] or {}) != spec.job_variables
                  or held[name]["work_pool_name"] != spec.work_pool
                  or held[name]["enforce_parameter_schema"] is not True
                  or held[name] != record.get(name))


def _record_path() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / RECORD


def enforce_parameter_schemas(client: Any, specs: dict[str, DeploymentSpec]) -> list[str]:
    """Turn parameter-schema enforcement back on for every deployment of this project that has it off, and
    return their names. `prefect deploy` creates deployments with it on, but when it updates one it sends only
    the fields prefect.yaml sets, so a deployment PATCHed to `enforce_parameter_schema=false` stayed so."""
    from prefect.client.schemas.actions import DeploymentUpdate

    fixed = []
    for d in client.read_deployments():
        if d.name in specs and d.work_pool_name == POOL and d.enforce_parameter_schema is not True:
            client.update_deployment(d.id, DeploymentUpdate(enforce_parameter_schema=True))
            fixed.append(d.name)
    return fixed


def write_record(client: Any, specs: dict[str, DeploymentSpec] | None = None) -> Path:
    """Keep what the server holds for this project's deployments (right after `prefect deploy` and
    `enforce_parameter_schemas`) in the Prefect home, written whole (a temporary file renamed), readable by
    this user only."""
    specs = specs or project_deployments()
    path = _record_path()
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(held_deployments(client, specs), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_record() -> dict[str, Any] | None:
    """The record `write_record` kept, or None when there is none (or it is not JSON)."""
    try:
        return json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.service close --reason stopped|restarted` (what serve.sh runs)."""
    ap = argparse.ArgumentParser(prog="python -m flows.service", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    close = sub.add_parser("close", help="end and crash the open runs of this project's deployments")
    close.add_argument("--reason", choices=sorted(REASONS), required=True)
    sub.add_parser("deployed", help="exit 0 if the server holds every deployment as deployments/prefect.yaml "
                                    "declares it and as `prefect deploy` stored it, 1 (naming the others) if not")
    sub.add_parser("record", help="after deploying: enforce the parameter schemas, keep what the server holds")
    args = ap.parse_args(argv)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if args.command == "deployed":
            stale = stale_deployments(client, record=read_record())
            if stale:
                print(f"serve: to deploy: {', '.join(stale)}")
            return 1 if stale else 0
        if args.command == "record":
            specs = project_deployments()
            for name in enforce_parameter_schemas(client, specs):
                print(f"serve: deployment {name}: its parameter schema is enforced again")
            write_record(client, specs)
            return 0
        lines = close_open_runs(client, args.reason)
    for line in lines:
        print(f"serve: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

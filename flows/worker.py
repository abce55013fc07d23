"""The worker of `make serve`: Prefect's process worker that runs only this project's deployments.

Whoever holds the API's auth string can create deployments and runs, edit the work pool, and point them at
`alignet-process`. Prefect's process worker runs whatever it is given: a pull step is a shell command, the
`command` job variable replaces the engine, `env` can preload a library. This worker checks each run before
it starts anything for it, against what it reads from its own checkout (deployments/prefect.yaml and
Prefect's default process template), which an API client cannot change: the deployment must be one of the
file's (name, entrypoint, pull steps, job variables), the run must add no job variables, the pool's template
must be Prefect's default, and the config must not connect to an outside Dask scheduler (a scheduler's
replies are unpickled in the run's process). Otherwise the run is marked Crashed with the reason and nothing
of it runs.

    python -m flows.worker          # what serve.sh starts (pool alignet-process, queue default)
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from pathlib import Path
from typing import Any

from prefect.workers.process import ProcessWorker

from flows.service import POOL, REPO, DeploymentSpec, project_deployments, same_pull_steps


class RunRefused(RuntimeError):
    """A flow run this worker will not start (the message says why)."""


def refusal(deployment: dict[str, Any] | None, run_job_variables: dict[str, Any] | None,
            parameters: dict[str, Any], pool_template: dict[str, Any],
            specs: dict[str, DeploymentSpec]) -> str | None:
    """Why this worker must not start a run, or None. `deployment`: the run's deployment as the API returns
    it (JSON; None for a run without one); `run_job_variables` and `parameters`: the run's own."""
    if deployment is None:
        return "not a run of a deployment (this worker runs only deployments/prefect.yaml's)"
    name = deployment.get("name")
    spec = specs.get(name)
    if spec is None:
        return f"deployment {name!r} is not one of deployments/prefect.yaml's ({', '.join(sorted(specs))})"
    if deployment.get("entrypoint") != spec.entrypoint:
        return f"deployment {name!r} has entrypoint {deployment.get('entrypoint')!r}, not {spec.entrypoint!r}"
    if not same_pull_steps(deployment.get("pull_steps") or [], spec.pull_steps):
        return f"deployment {name!r} has pull steps {deployment.get('pull_steps')!r}, not deployments/prefect.yaml's"
    if (deployment.get("job_variables") or {}) != spec.job_variables:
        return f"deployment {name!r} has job variables {deployment.get('job_variables')!r}, not {spec.job_variables!r}"
    for field in ("path", "storage_document_id", "infrastructure_document_id"):
        if deployment.get(field):
            return f"deployment {name!r} sets {field} (code from elsewhere); deployments/prefect.yaml's do not"
    if run_job_variables and run_job_variables != spec.job_variables:
        return f"the run sets job variables {run_job_variables!r}; runs of this service may not"
    if pool_template != ProcessWorker.get_default_base_job_template():
        return f"the base job template of work pool {POOL!r} was changed; serve.sh creates it with Prefect's default"
    address = _dask_address(parameters)
    if address:
        return (f"sample.dask_address is {address!r}: a service run may not connect to an outside Dask scheduler "
                "(its replies are unpickled in the run); run that config with `alignet run` instead")
    return None


def _dask_address(parameters: dict[str, Any]) -> str | None:
    """The run's `sample.dask_address` (config file, then overrides), or None; a config that does not load
    is not refused here: the flow fails on it with its own message before any work."""
    from alignet_core.config import load_config, parse_config, with_overrides
    from alignet_core.errors import AlignetError

    try:
        path = parameters.get("config_path")
        if path and not Path(path).is_absolute():
            path = str(REPO / path)
        cfg = load_config(path) if path else parse_config({})
        if overrides := {k: v for k, v in (parameters.get("overrides") or {}).items() if v is not None}:
            cfg = with_overrides(cfg, overrides)
    except (AlignetError, OSError, ValueError):
        return None
    return cfg.sample.dask_address


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # same worker type as ProcessWorker: Prefect warns of the second class

    class ProjectProcessWorker(ProcessWorker):
        """`ProcessWorker` that refuses (Crashed, with the reason) any run `refusal` names a reason for."""

        _description = "Runs only the deployments of this checkout's deployments/prefect.yaml."

        async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
            deployment = None
            if flow_run.deployment_id is not None:
                deployment = (await self.client.read_deployment(flow_run.deployment_id)).model_dump(mode="json")
            reason = refusal(deployment, flow_run.job_variables, dict(flow_run.parameters or {}),
                             self.work_pool.base_job_template, project_deployments())
            if reason:
                raise RunRefused(f"refused by the alignet worker: {reason}")
            return await super().run(flow_run=flow_run, configuration=configuration, task_status=task_status)


def main() -> int:
    """Poll `alignet-process` (queue `default`) and run this project's deployments until killed."""
    worker = ProjectProcessWorker(work_pool_name=POOL, work_queues=["default"])
    asyncio.run(worker.start(printer=print))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker of `make serve`: Prefect's process worker that runs only this project's deployments, and only
this checkout's code for them.

Whoever holds the API's auth string can create deployments and runs, edit them, edit the work pool, and
point them at `alignet-process`. Prefect's process worker runs whatever it is given: a pull step is a shell
command, the `command` job variable replaces the engine, `env` can preload a library. And checking a run
before starting it is not enough with Prefect's own engine: the process it starts reads the deployment again
from the API and runs the pull steps and the entrypoint it finds *then* (issue 34: a PATCH of the pull steps
a second after the check ran `touch` as the serving user), and a run's parameters can be changed by a PATCH
too. So this worker

1. checks each run against what it reads from its own checkout (deployments/prefect.yaml and Prefect's
   default process template), which an API client cannot change (`refusal`): the deployment must be one of
   the file's (name, entrypoint, pull steps, job variables, parameter schema enforced), the run must add no
   job variables, the pool's template must be Prefect's default, and the run's config (parsed exactly as the
   flow parses it) must not connect to an outside Dask scheduler (a scheduler's replies are unpickled in the
   run's process) nor come from a file another user could change; otherwise the run is marked Crashed
   "refused by the alignet worker: <reason>" and nothing of it runs;
2. starts the run itself, from what it verified: the job configuration comes from Prefect's default template
   and the file's job variables (not the pool's template nor the API's variables), the process is
   `python -m flows.engine` in this checkout (no pull step, no storage, no entrypoint from the API), and no
   crash or cancellation hook is loaded from the API (this project's flows define none);
3. `flows.engine` reads the run once, checks the deployment and the parameters again, and runs the flow of
   the file's entrypoint with exactly the parameters it checked.

    python -m flows.worker          # what serve.sh starts (pool alignet-process, queue default)
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Any

from prefect.workers.process import ProcessWorker

from flows.service import POOL, REPO, DeploymentSpec, project_deployments, same_pull_steps

#: the process that runs a verified flow run (cwd: this checkout)
ENGINE = (sys.executable, "-m", "flows.engine")


class RunRefused(RuntimeError):
    """A flow run this worker will not start (the message says why)."""


def refusal(deployment: dict[str, Any] | None, run_job_variables: dict[str, Any] | None,
            parameters: dict[str, Any], pool_template: dict[str, Any] | None,
            specs: dict[str, DeploymentSpec]) -> str | None:
    """Why this worker must not start a run, or None. `deployment`: the run's deployment as the API returns
    it (JSON; None for a run without one); `run_job_variables` and `parameters`: the run's own;
    `pool_template`: the work pool's base job template (None: not checked; the engine does not use it)."""
    reason = deployment_refusal(deployment, run_job_variables, specs)
    if reason:
        return reason
    if pool_template is not None and pool_template != ProcessWorker.get_default_base_job_template():
        return f"the base job template of work pool {POOL!r} was changed; serve.sh creates it with Prefect's default"
    return parameters_refusal(parameters)


def deployment_refusal(deployment: dict[str, Any] | None, run_job_variables: dict[str, Any] | None,
                       specs: dict[str, DeploymentSpec]) -> str | None:
    """Why the run's deployment (API JSON) or its own job variables are not deployments/prefect.yaml's."""
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
    if deployment.get("enforce_parameter_schema") is not True:
        return (f"deployment {name!r} does not enforce its parameter schema; `prefect deploy` of "
                "deployments/prefect.yaml does (restart `make serve` to redeploy)")
    if run_job_variables and run_job_variables != spec.job_variables:
        return f"the run sets job variables {run_job_variables!r}; runs of this service may not"
    return None


def parameters_refusal(parameters: dict[str, Any]) -> str | None:
    """Why a run's parameters (as the API holds them) may not run here: they do not validate as the flows'
    (`config_path`, `overrides`), or `config_refusal` names a reason."""
    from pydantic import ValidationError

    from alignet_core.io.limits import short
    from flows._config import Overrides

    extra = sorted(set(parameters) - {"config_path", "overrides"})
    if extra:
        return f"the run has parameters {short(extra)}; this project's flows take config_path and overrides"
    if _has_block_reference(parameters):
        return "a parameter holds a block reference ($ref); this project's flows take none"
    path, overrides = parameters.get("config_path"), parameters.get("overrides")
    if path is not None and not isinstance(path, str):
        return f"config_path is {short(path)}, not a path"
    try:
        validated = None if overrides is None else Overrides.model_validate(overrides)
    except ValidationError as err:
        return f"the run's overrides do not validate: {short(str(err).splitlines()[1:3], 300)}"
    return config_refusal(path, validated)


def _has_block_reference(value: Any) -> bool:
    """Whether a parameter holds a `{"$ref": ...}` (Prefect resolves those by loading a block from the API)."""
    if isinstance(value, dict):
        return "$ref" in value or any(_has_block_reference(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_block_reference(v) for v in value)
    return False


def config_refusal(config_path: str | None, overrides: Any) -> str | None:
    """Why the config a run would compute with may not run here: its file is one another user could change
    between this check and the flow's read (`untrusted_file`), it does not load (the flow would fail on it
    too), or it connects to an outside Dask scheduler. `overrides`: the flow's `Overrides` (or None), so the
    config is parsed exactly as the flow parses it (`flows._config.parsed_config`)."""
    from alignet_core.errors import AlignetError
    from alignet_core.io.limits import short
    from flows._config import parsed_config

    path = None
    if config_path is not None:
        path = Path(config_path) if Path(config_path).is_absolute() else REPO / config_path
        reason = untrusted_file(path)
        if reason:
            return f"config_path {config_path!r}: {reason}"
    try:
        cfg = parsed_config(str(path) if path else None, overrides)
    except (AlignetError, OSError, ValueError) as err:
        return f"the run's config does not load: {short(str(err), 300)}"
    if cfg.sample.dask_address:
        return (f"sample.dask_address is {cfg.sample.dask_address!r}: a service run may not connect to an outside "
                "Dask scheduler (its replies are unpickled in the run); run that config with `alignet run` instead")
    return None


def untrusted_file(path: Path) -> str | None:
    """Why another user could change the file at `path` (or what it leads to) after it was checked, or None:
    the file and every folder above it, as named and as resolved, must belong to this user or root, and none
    may be writable by others but a sticky folder (like /tmp, where only a file's owner may replace it)."""
    uid = os.getuid()
    path = Path(os.path.abspath(path))
    chains = [[*reversed(path.parents), path]]
    resolved = path.resolve()
    if resolved != path:
        chains.append([*reversed(resolved.parents), resolved])
    for chain in chains:
        for part in chain:
            try:
                st = part.lstat()
            except FileNotFoundError:
                return f"{part} does not exist"
            except OSError as err:
                return f"{part} cannot be checked ({err.strerror})"
            if st.st_uid not in (uid, 0):
                return f"{part} belongs to uid {st.st_uid}, not to the service's user"
            sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and not sticky_dir:
                return f"{part} is writable by other users (mode {oct(stat.S_IMODE(st.st_mode))})"
    return None


class _NoHooks:
    """The crash and cancellation hook runner of a service run: this project's flows define no such hooks,
    and Prefect's own would load the flow from the API (pull steps included) in the worker's process."""

    async def run_cancellation_hooks(self, flow_run: Any, state: Any) -> None:
        return None

    async def run_crashed_hooks(self, flow_run: Any, state: Any) -> None:
        return None


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # same worker type as ProcessWorker: Prefect warns of the second class

    class ProjectProcessWorker(ProcessWorker):
        """`ProcessWorker` that refuses (Crashed, with the reason) any run `refusal` names a reason for, and
        starts the others as `flows.engine` from what it verified (module docstring)."""

        _description = "Runs only the deployments of this checkout's deployments/prefect.yaml, with its code."

        async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
            deployment = None
            if flow_run.deployment_id is not None:
                deployment = await self.client.read_deployment(flow_run.deployment_id)
            specs = project_deployments()
            reason = refusal(deployment.model_dump(mode="json") if deployment else None, flow_run.job_variables,
                             dict(flow_run.parameters or {}), self.work_pool.base_job_template, specs)
            if reason:
                raise RunRefused(f"refused by the alignet worker: {reason}")
            # `configuration` was built from the pool's template and the API's job variables: not used
            return await self._start_engine(flow_run, deployment, specs[deployment.name], task_status)

        async def _start_engine(self, flow_run: Any, deployment: Any, spec: DeploymentSpec,
                                task_status: Any) -> Any:
            """Start `ENGINE` for a verified run in this checkout and wait for it (what `ProcessWorker.run`
            does for a configured command, with a configuration and a hook runner of our own)."""
            import anyio
            from prefect.runner._flow_run_executor import FlowRunExecutorContext
            from prefect.runner._starter_engine import EngineCommandStarter
            from prefect.utilities.processutils import command_to_string
            from prefect.workers.process import ProcessJobConfiguration, ProcessWorkerResult

            task_status = task_status or anyio.TASK_STATUS_IGNORED
            configuration = await ProcessJobConfiguration.from_template_and_values(
                base_job_template=ProcessWorker.get_default_base_job_template(), values=spec.job_variables,
                client=self.client)
            configuration.prepare_for_flow_run(flow_run=flow_run, deployment=deployment, work_pool=self.work_pool,
                                               worker_name=self.name, worker_id=self.backend_id)
            execution = None
            async with FlowRunExecutorContext() as ctx:
                starter = EngineCommandStarter(
                    command=command_to_string(list(ENGINE)), cwd=REPO, env=configuration.env,
                    stream_output=configuration.stream_output, control_channel=ctx.control_channel,
                    isolate_process_group=True, env_overrides_settings=True)
                executor = ctx.create_executor(flow_run, starter, propose_submitting=False, hook_runner=_NoHooks())

                async def execute(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as tg:
                    handle = await tg.start(execute)
                    if handle.pid is None:
                        raise RuntimeError("the flow run's process has no PID")
                    task_status.started(handle.pid)
            if execution is None or execution.status_code is None:
                raise RuntimeError("the flow run's process did not start")
            return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))


def main() -> int:
    """Poll `alignet-process` (queue `default`) and run this project's deployments until killed."""
    worker = ProjectProcessWorker(work_pool_name=POOL, work_queues=["default"])
    asyncio.run(worker.start(printer=print))
    return 0


if __name__ == "__main__":
    sys.exit(main())

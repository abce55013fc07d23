"""The engine of a service run: what `flows.worker` starts, in this checkout, instead of `prefect.engine`.

Prefect's engine (and the workspace supervisor before it) reads the run's deployment from the API when it
starts and runs the pull steps and the entrypoint it finds then, so a deployment changed after the worker's
check ran code of the changer's choosing (issue 34). This engine takes nothing that decides what runs from
the API: it reads the run once, checks its deployment and parameters against deployments/prefect.yaml
(`flows.worker.deployment_refusal`, `config_refusal` on the parameters as the flow validates them), imports
the flow of the file's entrypoint from this checkout, and hands Prefect's flow engine exactly the parameters
it checked. A run that fails a check is marked Crashed "refused by the alignet engine: <reason>" before any
of its code runs.

    PREFECT__FLOW_RUN_ID=<id> python -m flows.engine      # cwd: the repository root (the worker's doing)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any
from uuid import UUID

from alignet_core.runtime.malloc import STAGE_PROCESS, set_malloc_thresholds
from flows.service import DeploymentSpec, project_deployments
from flows.worker import config_refusal, deployment_refusal, parameters_refusal


def load_project_flow(spec: DeploymentSpec) -> Any:
    """The flow object of a deployment of deployments/prefect.yaml, imported from this checkout
    (`flows/alignet.py:alignet` → module `flows.alignet`, attribute `alignet`)."""
    path, _, name = spec.entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def engine_refusal(flow_run: Any, deployment: Any, specs: dict[str, DeploymentSpec]) -> tuple[str | None, Any]:
    """(why this run may not run, None) or (None, its flow): the deployment and the run's job variables as
    the worker checks them, the parameters as the API holds them, then as the flow itself validates them."""
    reason = deployment_refusal(deployment.model_dump(mode="json") if deployment else None,
                                flow_run.job_variables, specs)
    parameters = dict(flow_run.parameters or {})
    reason = reason or parameters_refusal(parameters)
    if reason:
        return reason, None
    flow = load_project_flow(specs[deployment.name])
    try:
        validated = flow.validate_parameters(parameters)
    except Exception as err:  # noqa: BLE001 - Prefect's ParameterTypeError and what pydantic raises
        return f"the run's parameters do not validate: {str(err)[:300]}", None
    return config_refusal(validated.get("config_path"), validated.get("overrides")), flow


def main() -> int:
    """Run the flow run `PREFECT__FLOW_RUN_ID` as `prefect.engine` would, from this checkout's code."""
    from prefect._internal.control_listener import configure_from_env
    from prefect.client.orchestration import get_client
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import flow_run_logger, run_flow
    from prefect.states import Crashed

    set_malloc_thresholds(STAGE_PROCESS)  # the run's stages run in this process
    flow_run_id = UUID(os.environ["PREFECT__FLOW_RUN_ID"])
    configure_from_env()  # the runner's control channel (cancellation), as prefect.engine does first
    with handle_engine_signals(flow_run_id):
        client = get_client(sync_client=True)
        flow_run = client.read_flow_run(flow_run_id)  # read once: what is checked is what runs
        logger = flow_run_logger(flow_run=flow_run)
        deployment = client.read_deployment(flow_run.deployment_id) if flow_run.deployment_id else None
        reason, flow = engine_refusal(flow_run, deployment, project_deployments())
        if reason:
            message = f"refused by the alignet engine: {reason}"
            logger.error(message)
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
            return 0
        run_flow(flow, flow_run=flow_run, parameters=dict(flow_run.parameters or {}), error_logger=logger)
    return 0


if __name__ == "__main__":
    sys.exit(main())

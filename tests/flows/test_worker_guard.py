"""The service worker's check (flows/worker.py `refusal`) and its engine's (flows/engine.py
`engine_refusal`): each of this project's deployments as `prefect deploy` stores it passes; every way an API
client could make the service run something else is refused with its reason, also when the deployment or
the parameters change after the worker's check (issue 34). The worker and its engine against a real API
server, the race included, are below (slow); on a real `make serve`, `tests/e2e/test_service_lifecycle.py`."""

from __future__ import annotations

import copy

import pytest
from prefect.workers.process import ProcessWorker

from flows.service import POOL, REPO, project_deployments
from flows.worker import refusal
from tests.e2e._service import SMALL_SLICE

SPECS = project_deployments()
TEMPLATE = ProcessWorker.get_default_base_job_template()
DEMO = {"config_path": "alignet_core/data/demo.yaml", "overrides": {}}


def _stored(name: str) -> dict:
    """The deployment as the API returns it after serve.sh's `prefect deploy` (the fields the check reads)."""
    spec = SPECS[name]
    return {"name": name, "entrypoint": spec.entrypoint, "pull_steps": copy.deepcopy(spec.pull_steps),
            "job_variables": copy.deepcopy(spec.job_variables), "path": None, "storage_document_id": None,
            "infrastructure_document_id": None, "enforce_parameter_schema": True}


def test_the_project_deployments_have_distinct_names_and_pass():
    assert set(SPECS) == {"regenerate-dataset", "teacher-embeddings", "human-alignment-transform",
                          "kmeans-clusters", "publish-triplets", "distill-student", "alignment-levels"}
    for name in SPECS:
        assert SPECS[name].work_pool == "alignet-process"
        assert SPECS[name].pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert refusal(_stored(name), {}, DEMO, TEMPLATE, SPECS) is None
        assert refusal(_stored(name), None, {"config_path": None, "overrides": {"cluster.k": 7}}, TEMPLATE,
                       SPECS) is None


def _edit(**fields) -> dict:
    dep = _stored("regenerate-dataset")
    dep.update(fields)
    return dep


@pytest.mark.parametrize("deployment, run_vars, params, template, says", [
    (None, {}, DEMO, TEMPLATE, "not a run of a deployment"),
    (_edit(name="evil"), {}, DEMO, TEMPLATE, "'evil' is not one of"),
    (_edit(entrypoint="/tmp/evil.py:f"), {}, DEMO, TEMPLATE, "entrypoint '/tmp/evil.py:f'"),
    (_edit(pull_steps=[{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]), {}, DEMO, TEMPLATE,
     "pull steps"),
    (_edit(pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": "/tmp"}}]), {}, DEMO,
     TEMPLATE, "pull steps"),
    (_edit(job_variables={"command": "sh -c id"}), {}, DEMO, TEMPLATE, "job variables"),
    (_edit(job_variables={"env": {"LD_PRELOAD": "/tmp/x.so"}}), {}, DEMO, TEMPLATE, "job variables"),
    (_edit(path="/tmp/elsewhere"), {}, DEMO, TEMPLATE, "sets path"),
    (_stored("regenerate-dataset"), {"command": "sh -c id"}, DEMO, TEMPLATE, "the run sets job variables"),
    (_stored("regenerate-dataset"), {}, DEMO,
     {**TEMPLATE, "job_configuration": {**TEMPLATE["job_configuration"], "command": "sh -c id"}}, "base job template"),
    (_stored("regenerate-dataset"), {}, {**DEMO, "overrides": {"sample.dask_address": "tcp://10.0.0.9:8786"}},
     TEMPLATE, "sample.dask_address is 'tcp://10.0.0.9:8786'"),
    # issue 34: with enforce_parameter_schema off the server let the field's Python name through; the old
    # check rejected that name and took it for "no address", the flow accepted it and connected
    (_stored("regenerate-dataset"), {}, {**DEMO, "overrides": {"sample__dask_address": "tcp://10.0.0.9:8786"}},
     TEMPLATE, "sample.dask_address is 'tcp://10.0.0.9:8786'"),
    (_edit(enforce_parameter_schema=False), {}, DEMO, TEMPLATE, "does not enforce its parameter schema"),
    (_stored("regenerate-dataset"), {}, {**DEMO, "overrides": {"cluster.kk": 3}}, TEMPLATE,
     "overrides do not validate"),
    (_stored("regenerate-dataset"), {}, {**DEMO, "extra": 1}, TEMPLATE, "this project's flows take config_path"),
    (_stored("regenerate-dataset"), {}, {**DEMO, "overrides": {"root": {"$ref": {"block_document_id": "x"}}}},
     TEMPLATE, "block reference"),
], ids=["no-deployment", "foreign-name", "entrypoint", "shell-pull-step", "other-workdir", "command", "env",
        "path", "run-job-variables", "pool-template", "dask-address", "dask-address-by-field-name",
        "schema-not-enforced", "unknown-override", "extra-parameter", "block-reference"])
def test_every_other_run_is_refused_with_its_reason(deployment, run_vars, params, template, says):
    reason = refusal(deployment, run_vars, params, template, SPECS)
    assert reason is not None and says in reason, reason


def test_a_config_file_naming_an_outside_scheduler_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sample:\n  dask_address: tcp://10.0.0.9:8786\n")
    reason = refusal(_stored("publish-triplets"), {}, {"config_path": str(cfg), "overrides": {}}, TEMPLATE, SPECS)
    assert reason is not None and "sample.dask_address" in reason
    # a config that does not load is refused with its own message (the flow would fail on it the same way)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  k: many\n")
    reason = refusal(_stored("publish-triplets"), {}, {"config_path": str(bad), "overrides": {}}, TEMPLATE, SPECS)
    assert reason is not None and "does not load" in reason and "cluster.k" in reason


def test_a_config_file_another_user_could_change_is_refused(tmp_path):
    """The worker and the flow each read the config file: one that another user may rewrite in between (its
    folder or the file writable by others, or not this user's) could name a scheduler after the check."""
    good = tmp_path / "c.yaml"
    good.write_text("cluster:\n  k: 5\n")
    params = {"config_path": str(good), "overrides": {}}
    assert refusal(_stored("publish-triplets"), {}, params, TEMPLATE, SPECS) is None
    good.chmod(0o666)
    assert "writable by other users" in refusal(_stored("publish-triplets"), {}, params, TEMPLATE, SPECS)
    good.chmod(0o644)
    tmp_path.chmod(0o777)
    try:
        assert "writable by other users" in refusal(_stored("publish-triplets"), {}, params, TEMPLATE, SPECS)
    finally:
        tmp_path.chmod(0o755)
    link = tmp_path / "link.yaml"
    link.symlink_to(good)
    assert refusal(_stored("publish-triplets"), {}, {"config_path": str(link)}, TEMPLATE, SPECS) is None
    missing = {"config_path": str(tmp_path / "nope.yaml")}
    assert "does not exist" in refusal(_stored("publish-triplets"), {}, missing, TEMPLATE, SPECS)


class _Run:
    """A flow run as the engine reads it from the API (the fields it uses)."""

    def __init__(self, parameters: dict, job_variables: dict | None = None):
        self.parameters, self.job_variables = parameters, job_variables or {}


class _Deployment:
    def __init__(self, fields: dict):
        self.name, self._fields = fields["name"], fields

    def model_dump(self, mode: str = "json") -> dict:
        return self._fields


def test_the_engine_checks_again_what_it_runs():
    """The engine (flows/engine.py) reads the run once and refuses a deployment or parameters changed after
    the worker's check, before any of the run's code: the pull steps, the entrypoint, an address by the
    field's name; what passes comes with this checkout's flow."""
    from flows.engine import engine_refusal
    from flows.stages import embed_flow

    ok, flow = engine_refusal(_Run(DEMO), _Deployment(_stored("teacher-embeddings")), SPECS)
    assert ok is None and flow is embed_flow
    touched = _stored("teacher-embeddings")
    touched["pull_steps"] = [{"prefect.deployments.steps.run_shell_script": {"script": "touch /tmp/x"}}]
    assert "pull steps" in engine_refusal(_Run(DEMO), _Deployment(touched), SPECS)[0]
    moved = _stored("teacher-embeddings")
    moved["entrypoint"] = "evil.py:f"
    assert "entrypoint 'evil.py:f'" in engine_refusal(_Run(DEMO), _Deployment(moved), SPECS)[0]
    foreign = {**DEMO, "overrides": {"sample__dask_address": "tcp://10.0.0.9:8786"}}
    reason, flow = engine_refusal(_Run(foreign), _Deployment(_stored("teacher-embeddings")), SPECS)
    assert "sample.dask_address is 'tcp://10.0.0.9:8786'" in reason and flow is None


class _Held:
    """A deployment as the server returns it (attributes and `model_dump(mode="json")`)."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)
        self._fields = fields

    def model_dump(self, mode: str = "json") -> dict:
        return copy.deepcopy(self._fields)


class _Server:
    def __init__(self, deployments: list[dict]):
        self.deployments = deployments

    def read_deployments(self) -> list[_Held]:
        return [_Held(d) for d in self.deployments]


def _as_deployed(name: str) -> dict:
    return {**_stored(name), "work_pool_name": POOL, "work_queue_name": "default", "parameters": DEMO,
            "parameter_openapi_schema": {"type": "object", "properties": {"config_path": {}, "overrides": {}}},
            "concurrency_limit": 1, "concurrency_options": None}


def test_the_up_to_date_check_covers_every_field_that_decides_what_runs():
    """Issue 34: `deployed` compared entrypoint, pull steps, job variables and pool only, so a deployment
    PATCHed to enforce_parameter_schema=false (or with a loosened schema, or another default config) was
    "up to date" and a restart kept it. Now every such field is compared with what `prefect deploy` stored."""
    from flows.service import RECORDED, stale_deployments

    held = [_as_deployed(name) for name in SPECS]
    server = _Server(held)
    record = {d["name"]: {f: d.get(f) for f in RECORDED} for d in held}
    assert stale_deployments(server, SPECS, record) == []
    assert stale_deployments(server, SPECS, None) == sorted(SPECS)  # no record: deploy
    for field, value in (("enforce_parameter_schema", False),
                         ("parameter_openapi_schema", {"type": "object", "properties": {}}),
                         ("parameters", {"config_path": "/tmp/other.yaml", "overrides": {}})):
        edited = [dict(d, **{field: value}) if d["name"] == "publish-triplets" else d for d in held]
        assert stale_deployments(_Server(edited), SPECS, record) == ["publish-triplets"], field


RACE_OVERRIDES = {**SMALL_SLICE, "source.limit": 24, "embed.batch_size": 8}


def _deploy(client, name: str) -> object:
    """`name` as serve.sh's `prefect deploy` stores it (the spec's fields, the flow's parameter schema)."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    spec = SPECS[name]
    module, _, attr = spec.entrypoint.partition(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
    flow_id = client.create_flow_from_name(flow.name)
    return client.create_deployment(
        flow_id=flow_id, name=name, entrypoint=spec.entrypoint, pull_steps=spec.pull_steps,
        job_variables=spec.job_variables, work_pool_name=POOL, enforce_parameter_schema=True,
        parameters=DEMO, parameter_openapi_schema=parameter_schema(flow).model_dump(exclude_unset=True))


@pytest.mark.slow
def test_a_run_changed_after_the_workers_check_runs_nothing_of_the_change(tmp_path, monkeypatch):
    """Issue 34, the race, made certain: the real worker checks a run of the real `teacher-embeddings`
    deployment, and right after its check (inside it, before it starts anything) the test PATCHes, through
    the API, (1) the deployment's pull steps to a `touch` of a canary, (2) the run's overrides to an outside
    Dask scheduler. Prefect's engine read the deployment again and ran the step (the canary appeared, the run
    Completed); now the worker's engine reads the run once, finds the change and marks it Crashed before any
    of its code runs. (3) An unchanged run still Completes through the worker's engine."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
    from prefect.testing.utilities import prefect_test_harness

    import flows.worker
    from flows.worker import ProjectProcessWorker

    canary = tmp_path / "canary"
    change: dict = {}
    checked = flows.worker.refusal

    def check_then_change(*args, **kwargs):
        reason = checked(*args, **kwargs)
        with get_client(sync_client=True) as c:
            if change.get("pull_steps"):
                c.update_deployment(change["deployment"], DeploymentUpdate(pull_steps=change["pull_steps"]))
            if change.get("parameters"):
                c.update_flow_run(change["run"], parameters=change["parameters"])
        return reason

    monkeypatch.setattr(flows.worker, "refusal", check_then_change)

    def run_once(dep_id, run_params: dict, **patch) -> dict:
        with get_client(sync_client=True) as c:
            run = c.create_flow_run_from_deployment(dep_id, parameters=run_params)
        change.clear()
        change.update(deployment=dep_id, run=run.id, **patch)

        async def work() -> None:
            async with ProjectProcessWorker(work_pool_name=POOL, work_queues=["default"]) as worker:
                await worker.get_and_submit_flow_runs()
        asyncio.run(work())
        with get_client(sync_client=True) as c:
            return c.read_flow_run(run.id).state.model_dump(mode="json")

    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as c:
            c.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                              base_job_template=ProcessWorker.get_default_base_job_template()))
            dep = _deploy(c, "teacher-embeddings")
        params = {**DEMO, "overrides": {**RACE_OVERRIDES, "root": str(tmp_path / "data")}}
        touch = [{"prefect.deployments.steps.run_shell_script": {"script": f"touch {canary}"}}]
        state = run_once(dep, params, pull_steps=touch)
        assert not canary.exists(), state
        assert state["type"] == "CRASHED" and "refused by the alignet engine" in state["message"], state
        assert "pull steps" in state["message"], state

        with get_client(sync_client=True) as c:  # the deployment as declared again
            c.update_deployment(dep, DeploymentUpdate(pull_steps=SPECS["teacher-embeddings"].pull_steps))
        foreign = {**params, "overrides": {**params["overrides"], "sample.dask_address": "tcp://10.0.0.9:8786"}}
        state = run_once(dep, params, parameters=foreign)
        assert state["type"] == "CRASHED" and "sample.dask_address is 'tcp://10.0.0.9:8786'" in state["message"], state

        state = run_once(dep, params)
        assert state["type"] == "COMPLETED", state
    assert (tmp_path / "data" / "stages" / "embed").is_dir()

"""The service worker's check (flows/worker.py `refusal`): each of this project's deployments as
`prefect deploy` stores it passes; every way an API client could make the worker run something else is
refused with its reason. The worker itself, refusing a foreign deployment on a real service, is
`tests/e2e/test_service_lifecycle.py` (slow)."""

from __future__ import annotations

import copy

import pytest
from prefect.workers.process import ProcessWorker

from flows.service import REPO, project_deployments
from flows.worker import refusal

SPECS = project_deployments()
TEMPLATE = ProcessWorker.get_default_base_job_template()
DEMO = {"config_path": "alignet_core/data/demo.yaml", "overrides": {}}


def _stored(name: str) -> dict:
    """The deployment as the API returns it after serve.sh's `prefect deploy` (the fields the check reads)."""
    spec = SPECS[name]
    return {"name": name, "entrypoint": spec.entrypoint, "pull_steps": copy.deepcopy(spec.pull_steps),
            "job_variables": copy.deepcopy(spec.job_variables), "path": None, "storage_document_id": None,
            "infrastructure_document_id": None}


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
], ids=["no-deployment", "foreign-name", "entrypoint", "shell-pull-step", "other-workdir", "command", "env",
        "path", "run-job-variables", "pool-template", "dask-address"])
def test_every_other_run_is_refused_with_its_reason(deployment, run_vars, params, template, says):
    reason = refusal(deployment, run_vars, params, template, SPECS)
    assert reason is not None and says in reason, reason


def test_a_config_file_naming_an_outside_scheduler_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sample:\n  dask_address: tcp://10.0.0.9:8786\n")
    reason = refusal(_stored("publish-triplets"), {}, {"config_path": str(cfg), "overrides": {}}, TEMPLATE, SPECS)
    assert reason is not None and "sample.dask_address" in reason
    # a config that does not load is left to the flow, which fails on it with its own message first
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  k: many\n")
    assert refusal(_stored("publish-triplets"), {}, {"config_path": str(bad), "overrides": {}}, TEMPLATE,
                   SPECS) is None

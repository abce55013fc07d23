"""`overrides` are checked against the config schema before a run exists: the deployment's parameter
schema (what the Prefect server enforces when a run is created) refuses an unknown field or a wrong
type, and accepts every real field (a real test server, a real deployment of the `embed` flow)."""

from __future__ import annotations

import pytest
from prefect import get_client
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.callables import parameter_schema

from flows._config import Overrides, as_dict
from flows.stages import embed_flow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_overrides_name_every_config_field_and_only_those():
    o = Overrides.model_validate({"cluster.k": 7, "keep_versions": None, "distill.devices": ["cpu", "cpu"]})
    assert as_dict(o) == {"cluster.k": 7, "keep_versions": None, "distill.devices": ["cpu", "cpu"]}
    assert as_dict({"seed": 1}) == {"seed": 1} and as_dict(None) == {}
    for bad in ({"clustr.k": 5}, {"cluster.k": "many"}, {"cluster.kk": 1}):
        with pytest.raises(ValueError):
            Overrides.model_validate(bad)


def test_the_server_refuses_a_run_with_bad_overrides_before_creating_it(harness):
    schema = parameter_schema(embed_flow).model_dump_for_openapi()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("embed")
        dep = client.create_deployment(flow_id=flow_id, name="schema-check", entrypoint="flows/stages.py:embed_flow",
                                       parameter_openapi_schema=schema, enforce_parameter_schema=True)
        before = len(client.read_flow_runs())
        for bad in ({"clustr.k": 5}, {"cluster.k": "many"}, {"root": ["not", "a", "path"]}):
            with pytest.raises(Exception, match="(?i)validation|invalid|422|409"):
                client.create_flow_run_from_deployment(dep, parameters={"overrides": bad})
        assert len(client.read_flow_runs()) == before
        run = client.create_flow_run_from_deployment(dep, parameters={"overrides": {"cluster.k": 7, "seed": 3}})
        assert run.parameters["overrides"] == {"cluster.k": 7, "seed": 3}

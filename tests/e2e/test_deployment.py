"""The README's service walk-through for real: `scripts/serve.sh` (a local Prefect server, the
process work pool, every deployment, a worker), `prefect deployment run` of the end-to-end
regeneration (shrunk by parameters) and of the distillation hand-off alone on the published
dataset, the dataset version checked with `alignet datasets`, artifacts and schedules read
through the API, and the weekly schedule switched on with one command.

Slow (a server, a worker and flow runs in subprocesses): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from alignet_core.sample import versions

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENTS = {"alignet/demo", "embed/demo", "transform/demo", "cluster/demo", "sample/demo", "distill/demo",
               "evaluate/demo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout} s:\n" + log.read_text()[-4000:])


def _client(env: dict) -> httpx.Client:
    """An API client as the UI and CLI are: the auth string (Basic) and a CSRF token."""
    auth = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    c = httpx.Client(base_url=env["PREFECT_API_URL"], headers={"Authorization": f"Basic {auth}"}, timeout=30)
    cid = str(uuid.uuid4())
    c.headers.update({"Prefect-Csrf-Token": c.get("/csrf-token", params={"client": cid}).json()["token"],
                      "Prefect-Csrf-Client": cid})
    return c


@pytest.fixture()
def service(tmp_path):
    """`scripts/serve.sh` on a free port with a private PREFECT_HOME; stopped (and checked
    stopped) at the end."""
    port = _free_port()
    env = {**os.environ, "PORT": str(port), "BIN": str(BIN), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)  # what the deployments set, not this test's process
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(REPO / "scripts" / "serve.sh")], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    api = env["PREFECT_API_URL"]

    auth_file = tmp_path / "prefect-home" / "api-auth-string"

    def deployed() -> bool:
        return DEPLOYMENTS <= _deployment_names(_client(env))

    def polling() -> bool:
        workers = _client(env).post("/work_pools/alignet-process/workers/filter", json={}).json()
        return any(w.get("status") == "ONLINE" for w in workers)

    try:
        _wait("the auth string", auth_file.exists, log)
        env["PREFECT_API_AUTH_STRING"] = auth_file.read_text().strip()
        _wait("deployments", deployed, log, timeout=600)  # seven deployments; slow on a shared 2-core machine
        _wait("worker", polling, log)
        yield env, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)


def _deployment_names(c: httpx.Client) -> set[str]:
    flows = {f["id"]: f["name"] for f in c.post("/flows/filter", json={}).json()}
    return {f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in c.post("/deployments/filter", json={}).json()}


def _cli(env: dict, *args: str, timeout: int = 300) -> str:
    res = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _latest_run(c: httpx.Client, flow: str) -> dict:
    runs = c.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 20}).json()
    flows = {f["id"]: f["name"] for f in c.post("/flows/filter", json={}).json()}
    return next(r for r in runs if flows.get(r["flow_id"]) == flow)


@pytest.mark.slow
def test_service_walkthrough(service, tmp_path):
    env, log = service
    prefect = str(BIN / "prefect")
    root = tmp_path / "data"
    overrides = {"root": str(root), "source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4,
                 "cluster.k": 5, "sample.n_train": 1000, "sample.n_valid": 200, "sample.shard_size": 500,
                 "distill.steps": 3, "distill.batch_triplets": 8, "distill.n_eval": 100}
    out = _cli(env, prefect, "deployment", "run", "alignet/demo", "--param", f"overrides={json.dumps(overrides)}",
               "--watch", "--watch-timeout", "900", timeout=960)
    assert "Completed" in out, out[-3000:] + log.read_text()[-3000:]
    client = _client(env)
    run = _latest_run(client, "alignet")
    assert run["state"]["type"] == "COMPLETED"

    # the pipeline's own log lines reach the run's logs (what the UI shows), not only Prefect's
    logs = client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}).json()
    lines = "\n".join(entry["message"] for entry in logs)
    assert "images embedded" in lines and "transformed store" in lines, lines[-3000:]

    # the published version, `latest`, and its checksums through the CLI
    listed = versions.list_versions(str(root), "demo")
    assert len(listed) == 1 and listed[0]["latest"]
    assert "files match their checksums" in _cli(env, str(BIN / "alignet"), "datasets", "verify", "--root", str(root))
    dataset = Path(listed[0]["path"]) / "uncertainty_distillation"
    assert sorted(p.name for p in dataset.glob("*.npz")) == [
        "train_between_class.npz", "train_cluster_border_5.npz", "valid_between_class.npz", "valid_cluster_border_5.npz"]

    # artifacts a person reads in the UI
    arts = _client(env).post("/artifacts/filter", json={}).json()
    by_key = {a["key"]: a for a in arts if a.get("key")}
    assert {"alignet-report", "dataset-files", "dataset-location", "student-accuracy", "transform-accuracy",
            "cluster-sizes", "embed-progress", "distill-progress"} <= set(by_key)
    assert "data:image/png;base64," in by_key["student-accuracy"]["data"]
    assert "10-NN overlap" in by_key["transform-accuracy"]["data"] and "Hyper-parameters used" in by_key[
        "transform-accuracy"]["data"]
    assert "data:image/png;base64," in by_key["cluster-sizes"]["data"]
    assert listed[0]["version"] in by_key["dataset-location"]["description"]

    # the distillation hand-off alone, on the published folder, through its own deployment
    alone = {**overrides, "root": str(tmp_path / "student-only"), "distill.dataset": str(dataset),
             "distill.join": "filenames"}
    out = _cli(env, prefect, "deployment", "run", "distill/demo", "--param", f"overrides={json.dumps(alone)}",
               "--watch", "--watch-timeout", "600", timeout=660)
    assert "Completed" in out, out[-3000:] + log.read_text()[-3000:]
    assert sorted(p.name for p in (tmp_path / "student-only" / "stages").iterdir()) == ["distill"]

    # the weekly regeneration: present, off, then on with one command
    def schedules() -> list[dict]:
        deps = _client(env).post("/deployments/filter", json={}).json()
        return [s for d in deps for s in d["schedules"]]

    assert [s["active"] for s in schedules()] == [False]
    _cli(env, prefect, "--no-prompt", "deployment", "schedule", "resume", "--all")
    assert [s["active"] for s in schedules()] == [True]
    _cli(env, prefect, "--no-prompt", "deployment", "schedule", "pause", "--all")
    assert [s["active"] for s in schedules()] == [False]


@pytest.mark.slow
def test_the_service_is_locked_down(service, tmp_path):
    """`make serve`'s API: a request without the auth string, a wrong one, and a state-changing request
    without a CSRF token are refused; a foreign page's Origin gets no CORS grant; the UI's own origin
    does; the auth string is kept in the project's Prefect home, readable by its owner only; a
    deployment run through the CLI with the auth string completes."""
    env, log = service
    api = env["PREFECT_API_URL"]
    auth_file = Path(env["PREFECT_HOME"]) / "api-auth-string"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600" and len(env["PREFECT_API_AUTH_STRING"]) >= 40

    assert httpx.get(f"{api}/admin/version", timeout=10).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code in (401, 403)  # CSRF or auth first
    wrong = base64.b64encode(b"guess").decode()
    assert httpx.get(f"{api}/admin/version", headers={"Authorization": f"Basic {wrong}"},
                     timeout=10).status_code == 401
    right = {"Authorization": "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()}
    assert httpx.get(f"{api}/admin/version", headers=right, timeout=10).status_code == 200
    no_csrf = httpx.post(f"{api}/flows/", json={"name": "intruder"}, headers=right, timeout=10)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text, no_csrf.text

    ui = api.removesuffix("/api")
    for origin, granted in (("http://evil.example", False), (ui, True)):
        pre = httpx.options(f"{api}/deployments/filter", timeout=10,
                            headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert (pre.headers.get("access-control-allow-origin") == origin) is granted, (origin, pre.headers)
    assert httpx.get(f"{api}/health", timeout=10, headers={"Origin": "http://evil.example"}).headers.get(
        "access-control-allow-origin") is None

    root = tmp_path / "data"
    overrides = {"root": str(root), "source.limit": 24, "embed.batch_size": 8}
    out = _cli(env, str(BIN / "prefect"), "deployment", "run", "embed/demo", "--param",
               f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600", timeout=660)
    assert "Completed" in out, out[-3000:] + log.read_text()[-3000:]
    assert (root / "stages" / "embed").is_dir()

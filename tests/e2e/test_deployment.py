"""The README's service walk-through for real: `scripts/serve.sh` (a local Prefect server, the
process work pool, every deployment, a worker), `prefect deployment run` of the end-to-end
regeneration (shrunk by parameters) and of the distillation hand-off alone on the published
dataset, the dataset version checked with `alignet datasets`, artifacts and schedules read
through the API, and the weekly schedule switched on and off by the deployment's name.

Slow (a server, a worker and flow runs in subprocesses): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from alignet_core.sample import versions
from tests.e2e._service import BIN, REPO, SMALL_SLICE, Service, free_port
from tests.e2e._service import client as _client


@pytest.fixture()
def service(tmp_path):
    """`scripts/serve.sh` on a free port with a private PREFECT_HOME; stopped (and checked stopped,
    with no process of it left) at the end."""
    svc = Service(tmp_path / "prefect-home", free_port(), tmp_path / "serve.log")
    try:
        yield svc.env, svc.log
    finally:
        left = svc.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{svc.env['PREFECT_API_URL']}/health", timeout=2)
    assert left == [], left


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
    overrides = {"root": str(root), **SMALL_SLICE, "source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4,
                 "cluster.k": 5, "sample.n_train": 1000, "sample.n_valid": 200, "sample.shard_size": 500,
                 "distill.steps": 3, "distill.batch_triplets": 8, "distill.n_eval": 100}
    out = _cli(env, prefect, "deployment", "run", "alignet/regenerate-dataset", "--param", f"overrides={json.dumps(overrides)}",
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

    # scripts/screenshot_ui.py finds the run and its artifacts through the locked-down API (auth string from
    # PREFECT_HOME, CSRF token), and refuses a wrong string with a one-line error
    spec = importlib.util.spec_from_file_location("screenshot_ui", REPO / "scripts" / "screenshot_ui.py")
    shots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shots)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_AUTH_STRING", raising=False)
        mp.setenv("PREFECT_HOME", env["PREFECT_HOME"])
        api = shots.api_client(env["PREFECT_API_URL"], shots.auth_string())
        assert shots.latest_completed_run(api)["id"] == run["id"]
        assert {"alignet-report", "student-accuracy", "dataset-files"} <= set(shots.run_artifacts(api, run["id"]))
        with pytest.raises(SystemExit, match="refused the auth string"):
            shots.api_client(env["PREFECT_API_URL"], "wrong")

    # the distillation hand-off alone, on the published folder, through its own deployment
    alone = {**overrides, "root": str(tmp_path / "student-only"), "distill.dataset": str(dataset),
             "distill.join": "filenames"}
    out = _cli(env, prefect, "deployment", "run", "distill/distill-student", "--param", f"overrides={json.dumps(alone)}",
               "--watch", "--watch-timeout", "600", timeout=660)
    assert "Completed" in out, out[-3000:] + log.read_text()[-3000:]
    assert sorted(p.name for p in (tmp_path / "student-only" / "stages").iterdir()) == ["distill"]

    # the weekly regeneration: present, off, then on and off again by the deployment's name and the schedule's
    # ID (what the README says; never --all, which would reach other projects' deployments)
    def schedules() -> list[dict]:
        deps = _client(env).post("/deployments/filter", json={}).json()
        return [s for d in deps for s in d["schedules"]]

    assert [s["active"] for s in schedules()] == [False]
    regen = "alignet/regenerate-dataset"
    listed = _cli(env, prefect, "deployment", "schedule", "ls", regen)
    assert "cron: 0 3 * * 1" in listed, listed
    (sched,) = json.loads(_cli(env, prefect, "deployment", "schedule", "ls", regen, "-o", "json"))
    assert sched["slug"] == "weekly-regeneration"
    _cli(env, prefect, "deployment", "schedule", "resume", regen, sched["id"])
    assert [s["active"] for s in schedules()] == [True]
    _cli(env, prefect, "deployment", "schedule", "pause", regen, sched["id"])
    assert [s["active"] for s in schedules()] == [False]
    # the cron is named where the deployment is shown (its description)
    (dep,) = [d for d in _client(env).post("/deployments/filter", json={}).json() if d["name"] == "regenerate-dataset"]
    assert "0 3 * * 1" in dep["description"] and "Mondays 03:00 UTC" in dep["description"]


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
    # issue 34: the database (every run's parameters and logs) was 644; the home and all in it are private
    home = Path(env["PREFECT_HOME"])
    assert home.stat().st_mode & 0o777 == 0o700 and (home / "prefect.db").stat().st_mode & 0o777 == 0o600
    assert [p for p in home.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o077] == []

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
    overrides = {"root": str(root), **SMALL_SLICE, "source.limit": 24, "embed.batch_size": 8}
    out = _cli(env, str(BIN / "prefect"), "deployment", "run", "embed/teacher-embeddings", "--param",
               f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600", timeout=660)
    assert "Completed" in out, out[-3000:] + log.read_text()[-3000:]
    assert (root / "stages" / "embed").is_dir()

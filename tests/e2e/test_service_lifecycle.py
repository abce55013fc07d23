"""`make serve` operated for months: stopped mid-run, killed mid-run, restarted, and its worker
offered a foreign deployment. A real `scripts/serve.sh` (server, pool, deployments, worker) on one
Prefect home, three times:

1. a Ctrl-C (SIGINT to serve.sh alone) mid-run: serve.sh exits by itself, no process it started survives
   (the run's engine included, which Prefect starts in a session of its own), no traceback, and the run is
   Crashed with the reason, its slot free;
2. a SIGKILL of serve.sh mid-run: its watchdog ends every process it started; the run stays Running in the
   database (nothing could mark it);
3. a restart: the orphaned run is marked Crashed before the worker starts, and a new run of the same
   deployment gets the slot and runs; a foreign deployment whose pull step would run a shell command is
   refused (Crashed, with the reason) and its command never runs; a deployment PATCHed before the restart
   to stop enforcing its parameter schema is redeployed as declared (issue 34); a run of the real
   `teacher-embeddings` whose deployment gets a `touch` pull step while it is Pending never runs it.

Slow (three service starts, real flow runs): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.e2e._service import BIN, REPO, SMALL_SLICE, Service, api, client, free_port, wait

#: a regeneration that is still computing a minute after it starts (the transform fit) on a small source
LONG = {**SMALL_SLICE, "source.limit": 120, "transform.epochs": 5000, "cluster.k": 5}


def _run(svc: Service, root, **extra) -> str:
    overrides = {"root": str(root), **LONG, **extra}
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "alignet/regenerate-dataset", "--param",
                          f"overrides={json.dumps(overrides)}"], cwd=REPO, env=svc.env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return next(line.split("UUID:")[1].strip() for line in out.stdout.splitlines() if "UUID:" in line)


def _state(svc: Service, run_id: str) -> dict:
    return client(svc.env).get(f"/flow_runs/{run_id}").json()["state"]


def _engine_running(svc: Service, run_id: str) -> bool:
    """The run is Running and its engine process (`flows.engine`, a child of the worker) computes."""
    return _state(svc, run_id)["type"] == "RUNNING" and any(
        "flows.engine" in " ".join(p.cmdline()) for p in svc.processes())


def _patch(svc: Service, path: str, body: dict, tries: int = 5) -> None:
    """A PATCH through the API (it answers 204, no body), as any holder of the auth string may send; a 5xx
    (SQLite busy while a run computes) is retried, as `api` does."""
    for _ in range(tries):
        r = client(svc.env).patch(path, json=body)
        if r.status_code < 500:
            break
        time.sleep(2)
    assert r.status_code == 204, (path, r.status_code, r.text[:1000])


def _deployment(svc: Service, name: str) -> dict:
    (dep,) = [d for d in api(client(svc.env), "POST", "/deployments/filter", {}) if d["name"] == name]
    return dep


@pytest.mark.slow
def test_stop_kill_and_restart_leave_no_process_and_no_blocked_slot(tmp_path):
    home, port, log = tmp_path / "prefect-home", free_port(), tmp_path / "serve.log"
    root = tmp_path / "data"

    # 1. Ctrl-C mid-run
    svc = Service(home, port, log)
    try:
        first = _run(svc, root)
        wait("the first run computing", lambda: _engine_running(svc, first), svc.log, timeout=600)
        mark = len(log.read_text())
        t0 = time.time()
        left = svc.stop(signal.SIGINT, timeout=180)
        stopped_in = time.time() - t0
    finally:
        svc.stop()
    assert left == [], left
    assert svc.proc.returncode == 0, log.read_text()[-3000:]
    tail = log.read_text()[mark:]
    assert "serve: stopped" in tail and "Traceback" not in tail, tail[-3000:]
    assert f"({first}): " in tail and "marked Crashed (stopped)" in tail, tail[-3000:]
    print(f"serve.sh stopped in {stopped_in:.0f} s")

    # 2. SIGKILL mid-run: the watchdog ends everything serve.sh started
    svc = Service(home, port, log)
    try:
        assert _state(svc, first)["type"] == "CRASHED"
        assert "was stopped while this run was in flight" in _state(svc, first)["message"]
        second = _run(svc, root)
        wait("the second run computing", lambda: _engine_running(svc, second), svc.log, timeout=600)
        # issue 34: a deployment that no longer enforces its parameter schema was "up to date" on a restart
        bypass = _deployment(svc, "publish-triplets")
        _patch(svc, f"/deployments/{bypass['id']}", {"enforce_parameter_schema": False})
        left = svc.stop(signal.SIGKILL)
    finally:
        svc.stop()
    assert left == [], left

    # 3. restart: the orphan is crashed before the worker starts; the next run gets the slot
    svc = Service(home, port, log)
    try:
        state = _state(svc, second)
        assert state["type"] == "CRASHED" and state["message"].startswith("orphaned"), state
        assert _deployment(svc, "publish-triplets")["enforce_parameter_schema"] is True
        assert "serve: to deploy: " in log.read_text() and "publish-triplets" in log.read_text()
        third = _run(svc, root)
        wait("the third run computing", lambda: _engine_running(svc, third), svc.log, timeout=300)

        canary = tmp_path / "canary"
        c = client(svc.env)
        flow_id = api(c, "POST", "/flows/", {"name": "intruder"})["id"]
        dep = api(c, "POST", "/deployments/", {
            "name": "evil", "flow_id": flow_id, "work_pool_name": "alignet-process",
            "entrypoint": "flows/alignet.py:alignet",
            "pull_steps": [{"prefect.deployments.steps.run_shell_script": {"script": f"touch {canary}"}}]})
        foreign = api(c, "POST", f"/deployments/{dep['id']}/create_flow_run", {})["id"]
        wait("the foreign run refused", lambda: _state(svc, foreign)["type"] == "CRASHED", svc.log, timeout=180)
        assert "refused by the alignet worker: deployment 'evil' is not one of" in _state(svc, foreign)["message"]
        assert not canary.exists()

        # issue 34, the race on the live service: the real deployment's pull steps PATCHed while its run is
        # Pending (after the worker's check, or before it: either way nothing of the change runs)
        raced = tmp_path / "raced"
        embed = _deployment(svc, "teacher-embeddings")
        run = api(c, "POST", f"/deployments/{embed['id']}/create_flow_run",
                  {"parameters": {"overrides": {"root": str(root), **SMALL_SLICE, "source.limit": 24}}})["id"]
        wait("the raced run pending", lambda: _state(svc, run)["type"] in ("PENDING", "RUNNING", "CRASHED"),
             svc.log, timeout=600)
        _patch(svc, f"/deployments/{embed['id']}", {"pull_steps": [
            {"prefect.deployments.steps.run_shell_script": {"script": f"touch {raced}"}}]})
        wait("the raced run over", lambda: _state(svc, run)["type"] in ("COMPLETED", "CRASHED", "FAILED"),
             svc.log, timeout=600)
        assert not raced.exists(), _state(svc, run)
    finally:
        left = svc.stop()
    assert left == [], left

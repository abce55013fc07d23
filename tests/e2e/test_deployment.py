"""A real local Prefect server, a process work pool, `prefect deploy`, a worker and
`prefect deployment run` on the demo deployment (shrunk by parameters), checked through the API.

Slow (a server, a worker and a flow run in subprocesses): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PWD": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    procs: list[subprocess.Popen] = []

    def start(*args: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen([str(BIN / "prefect"), *args], cwd=REPO, env=env, start_new_session=True,
                             stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    start("server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("Prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
    try:
        yield env, start
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _prefect(env: dict, *args: str, timeout: int = 300) -> str:
    res = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.slow
def test_deployment_run_through_a_worker(server, tmp_path):
    env, start = server
    _prefect(env, "work-pool", "create", "alignet-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    start("worker", "start", "--pool", "alignet-process", log="worker.log")
    root = tmp_path / "data"
    overrides = {"root": str(root), "source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4,
                 "cluster.k": 5, "sample.n_train": 1000, "sample.n_valid": 200, "sample.shard_size": 500,
                 "distill.steps": 3, "distill.batch_triplets": 8, "distill.n_eval": 100}
    out = _prefect(env, "deployment", "run", "alignet/demo", "--param", f"overrides={json.dumps(overrides)}",
                   "--watch", "--watch-timeout", "900", timeout=960)
    assert "Completed" in out, out[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]

    api = env["PREFECT_API_URL"]
    runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30).json()
    assert runs and runs[0]["state"]["type"] == "COMPLETED"
    keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}, timeout=30).json()}
    assert {"alignet-report", "dataset-files", "student-accuracy", "transform-accuracy", "cluster-sizes"} <= keys
    summary = json.loads(next(root.glob("reports/demo/*/summary.json")).read_text())
    assert summary["n_triplets"] > 0 and Path(summary["dataset"]).is_dir()
    schedules = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()[0]["schedules"]
    assert schedules and schedules[0]["active"] is False  # weekly regeneration, off until enabled

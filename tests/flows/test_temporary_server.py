"""The CLI's own start of Prefect's temporary server (a fully cached rerun pays seconds, not the
server's import and start one after the other): one per process, used by the flow, stopped at exit; none
when a server is configured."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import httpx
from prefect import flow
from prefect.settings import get_current_settings
from flows.temporary_server import TemporaryServer

server = TemporaryServer.start()
assert TemporaryServer.start() is server  # one per process
server.wait_ready()
assert httpx.get(server.api_url + "/health").status_code == 200

@flow
def answer() -> int:
    return 42

with server.in_use():
    assert get_current_settings().api.url == server.api_url
    assert answer() == 42
    runs = httpx.post(server.api_url + "/flow_runs/filter", json={}).json()
assert [r["state"]["type"] for r in runs] == ["COMPLETED"], runs
print(server.proc.pid)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, **extra}


@pytest.mark.slow
def test_the_server_runs_a_flow_and_is_gone_when_the_process_exits(tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(PREFECT_HOME=str(tmp_path / "home")))
    assert res.returncode == 0, res.stderr[-3000:]
    pid = int(res.stdout.split()[-1])
    deadline = time.time() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_no_server_is_started_when_one_is_configured():
    probe = "from flows.temporary_server import TemporaryServer; print(TemporaryServer.start())"
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=_env(PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr[-2000:]

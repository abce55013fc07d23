"""`scripts/serve.sh` for the service tests: started on a free port with a private Prefect home and a
marker in its environment (every process it starts inherits it), an authenticated API client, waits."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENTS = {"alignet/regenerate-dataset", "embed/teacher-embeddings", "transform/human-alignment-transform",
               "cluster/kmeans-clusters", "sample/publish-triplets", "distill/distill-student",
               "evaluate/alignment-levels"}
MARKER = "ALIGNET_TEST_MARKER"

#: overrides for a slice of the demo too small for its THINGS concepts (a few dozen emoji show none or a
#: handful): the taxonomy proxy instead of the shipped trials. These tests are about the service; the human
#: route runs end to end in tests/flows/test_people_flow.py.
SMALL_SLICE = {"human.shipped": None, "human.densify": None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sigint() -> None:
    """In the child before it execs: SIGINT back to its default (a background parent may have ignored it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait(what: str, check, log: Path, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    """Until `check()` holds; fails after `timeout` seconds, or at once when `proc` (the service) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the service exited (code {proc.returncode}) before {what} was ready:\n"
                        + log.read_text()[-4000:])
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout} s:\n" + log.read_text()[-4000:])


def client(env: dict) -> httpx.Client:
    """An API client as the UI and CLI are: the auth string (Basic) and a CSRF token."""
    auth = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    c = httpx.Client(base_url=env["PREFECT_API_URL"], headers={"Authorization": f"Basic {auth}"}, timeout=30)
    cid = str(uuid.uuid4())
    c.headers.update({"Prefect-Csrf-Token": c.get("/csrf-token", params={"client": cid}).json()["token"],
                      "Prefect-Csrf-Client": cid})
    return c


def api(c: httpx.Client, method: str, path: str, json: dict | None = None, tries: int = 5) -> dict:
    """One API call whose answer must be a success: a transient failure (a timeout, a 5xx such as SQLite's
    "database is locked" while a run computes on a loaded machine) is retried; any other answer fails the test
    naming the status and the body, not a KeyError on a missing field."""
    for attempt in range(tries):
        try:
            r = c.request(method, path, json=json)
        except httpx.TimeoutException:
            if attempt == tries - 1:
                raise
            time.sleep(2)
            continue
        if r.status_code < 500 or attempt == tries - 1:
            break
        time.sleep(2)
    assert r.is_success, f"{method} {path} -> {r.status_code}: {r.text[:2000]}"
    return r.json()


def deployment_names(c: httpx.Client) -> set[str]:
    flows = {f["id"]: f["name"] for f in c.post("/flows/filter", json={}).json()}
    return {f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in c.post("/deployments/filter", json={}).json()}


def marked(marker: str) -> list[psutil.Process]:
    """Every live process whose environment carries `marker` (started by the service under test)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


class Service:
    """One `scripts/serve.sh` process (its own session) on `home` and `port`; `env` is what a client
    needs (API URL, auth string)."""

    def __init__(self, home: Path, port: int, log: Path):
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, "PORT": str(port), "BIN": str(BIN), "PREFECT_HOME": str(home),
                    "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    MARKER: self.marker}
        self.env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)  # what the deployments set, not this process's
        self.log = log
        start = log.stat().st_size if log.exists() else 0
        # as from a terminal: a shell started with SIGINT ignored (pytest run in the background of a script) could
        # not trap the Ctrl-C the tests send
        self.proc = subprocess.Popen([str(REPO / "scripts" / "serve.sh")], cwd=REPO, env=self.env,
                                     start_new_session=True, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                     preexec_fn=_default_sigint)
        try:
            auth_file = home / "api-auth-string"
            wait("the auth string", auth_file.exists, log, proc=self.proc)
            self.env["PREFECT_API_AUTH_STRING"] = auth_file.read_text().strip()
            # deploying imports every flow: minutes on a busy shared machine
            wait("deployments", lambda: DEPLOYMENTS <= deployment_names(client(self.env)), log, timeout=900,
                 proc=self.proc)
            wait("worker", lambda: self._polling() and b"' started!" in log.read_bytes()[start:], log,
                 proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def _polling(self) -> bool:
        workers = client(self.env).post("/work_pools/alignet-process/workers/filter", json={}).json()
        return any(w.get("status") == "ONLINE" for w in workers)

    def processes(self) -> list[psutil.Process]:
        return marked(self.marker)

    def send(self, sig: int) -> None:
        """`sig` to serve.sh alone (as a Ctrl-C in its terminal or `kill` would)."""
        os.kill(self.proc.pid, sig)

    def survivors(self, timeout: float = 30) -> list[str]:
        """The service's processes still alive after up to `timeout` seconds (the watchdog needs a moment
        after serve.sh exits), killed after they are listed."""
        deadline = time.time() + timeout
        while (left := self.processes()) and time.time() < deadline:
            time.sleep(1)
        out = []
        for proc in left:
            try:
                out.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
                proc.kill()
            except psutil.Error:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> list[str]:
        """`sig` to serve.sh, wait for it to exit (SIGKILL after `timeout` s); returns `survivors()`."""
        if self.proc.poll() is None:
            self.send(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.survivors()

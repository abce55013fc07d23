"""Prefect's temporary API server for one `alignet` command, started before the stages load.

Without a configured server (`PREFECT_API_URL`), Prefect starts a temporary one when a flow first needs
it: it imports the whole server into this process (about 5 s on 2 cores) and then waits while a second
process starts it (about 5 s more), all before the first stage is even planned. On a fully cached rerun
that was most of the command's time. The CLI instead starts the same server process (the command line of
Prefect's own `SubprocessASGIServer`) as soon as it knows a flow will run, so that its start overlaps the
loading of the stages and the config's checks, and points this process's Prefect settings at it.

The server keeps its database in the Prefect home (every run's parameters and logs), so the home is made
private to this user first (`private_home`) and the server starts with umask 077.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import prefect
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

log = logging.getLogger(__name__)

PORT_IN_USE = 3  # uvicorn's exit code when its port was taken (between our choosing it and binding it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_home(home: Path) -> None:
    """Create the Prefect home private to this user (mode 700), or make an existing one so: the folder and
    everything in it lose every group and other permission (a home made earlier by another tool with the
    default umask was 755, its database 644). Symbolic links are left alone; so is what this user does not
    own (its chmod would fail)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for dirpath, _, filenames in os.walk(home):  # every folder comes as a dirpath; linked ones are not walked
        for path in [Path(dirpath), *(Path(dirpath) / n for n in filenames)]:
            try:
                st = path.lstat()
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    path.chmod(stat.S_IMODE(st.st_mode) & ~0o077)
            except OSError as err:
                log.warning("%s: could not make it private (%s)", path, err)


class TemporaryServer:
    """A Prefect API server in a child process on a free local port, for this process only (one per
    process, as Prefect's own: a second `start` returns the first while it runs)."""

    _running: TemporaryServer | None = None

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc = self._spawn()
        # stopped at exit, after Prefect's log and event workers (registered later, so run earlier) have
        # sent what they hold: stopping it when the flow returns would lose the run's last log lines
        atexit.register(self.stop)

    @classmethod
    def start(cls) -> TemporaryServer | None:
        """Start one when Prefect would (no API URL configured, temporary servers allowed); else None."""
        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            return None
        if cls._running is None or cls._running.proc.poll() is not None:
            cls._running = cls()
        return cls._running

    def _spawn(self) -> subprocess.Popen[bytes]:
        """The command line and environment of Prefect 3.8's `SubprocessASGIServer._run_uvicorn_command`."""
        env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        private_home(Path(get_current_settings().home))
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **env,
                 **get_current_settings().to_environment_variables(exclude_unset=True)},
            umask=0o077,
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server answers its health check; `RuntimeError` naming why when it cannot start."""
        limit = timeout or get_current_settings().server.ephemeral.startup_timeout_seconds
        deadline = time.monotonic() + limit
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code == PORT_IN_USE:  # the port was taken meanwhile: another one
                    self.port = _free_port()
                    self.proc = self._spawn()
                elif code is not None:
                    raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered")
                else:
                    with contextlib.suppress(httpx.TransportError):
                        if client.get(f"{self.api_url}/health").status_code == 200:
                            log.debug("temporary Prefect server ready on %s", self.api_url)
                            return
                time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary server did not answer on {self.api_url} within {limit:g} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """This process's Prefect settings point at the server (the flow, its tasks, its Dask workers)."""
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def stop(self) -> None:
        """Terminate the server (killed after 5 s), as Prefect stops its own."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

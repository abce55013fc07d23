"""The Prefect home (`.prefect/`: the database with every run's parameters and logs, serve.sh's API auth
string, Prefect's result files) is private to its user, whoever created it first (issue 34: the folder was
700 only when serve.sh made it; in a clone where `make demo` made it first it was 755, `prefect.db` 644)."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _world_readable_home(home: Path) -> None:
    """A home as a default umask (022) leaves it: folders 755, files 644."""
    (home / "storage").mkdir(parents=True)
    for f in (home / "prefect.db", home / "storage" / "result.json", home / "serve.lock"):
        f.touch()
    for p in (home, home / "storage"):
        p.chmod(0o755)
    for f in (home / "prefect.db", home / "storage" / "result.json", home / "serve.lock"):
        f.chmod(0o644)


def _private(home: Path) -> list[str]:
    """Everything under `home` (itself included) that a group or another user may read, write or enter."""
    return [f"{p} {oct(_mode(p))}" for p in [home, *home.rglob("*")] if not p.is_symlink() and _mode(p) & 0o077]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_sh_makes_an_existing_home_private_before_anything_else(tmp_path):
    """serve.sh on a home another tool made world-readable: it tightens it as its first step, before it even
    finds that another serve.sh holds the home (this test holds `serve.lock`, so it stops there, in a second)."""
    home = tmp_path / ".prefect"
    _world_readable_home(home)
    with open(home / "serve.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env = {**os.environ, "BIN": str(BIN), "PREFECT_HOME": str(home), "PORT": str(_free_port())}
        out = subprocess.run([str(REPO / "scripts" / "serve.sh")], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1 and "another serve.sh runs" in out.stderr, out.stdout + out.stderr
    assert _private(home) == [], _private(home)
    assert _mode(home) == 0o700 and _mode(home / "prefect.db") == 0o600
    assert _mode(home / "api-auth-string") == 0o600  # generated on this first start, private from birth


CLI_SERVER = """
import json
from flows.temporary_server import TemporaryServer
server = TemporaryServer.start()
server.wait_ready()
server.stop()
"""


@pytest.mark.slow
def test_the_cli_temporary_server_keeps_its_home_private(tmp_path):
    """The CLI's temporary server (what `make demo` and `alignet run` start) on a world-readable home: the
    home and the database it migrates are private, and what the server creates (SQLite's files) too."""
    home = tmp_path / ".prefect"
    _world_readable_home(home)
    (home / "prefect.db").unlink()  # the server creates it (umask 077)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                "PYTHONPATH": str(REPO)})
    out = subprocess.run([sys.executable, "-c", CLI_SERVER], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (home / "prefect.db").exists()
    assert _private(home) == [], _private(home)

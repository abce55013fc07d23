"""`kill -9` of the `alignet` CLI mid-run leaves no process behind: not Prefect's temporary
server (it used to live on, 235 MB, on its port), not the sampling stage's Dask workers, not the embed
stage's DataLoader workers. The CLI's watchdog (alignet_core/runtime/lifeline.py) ends them.

The CLI runs the demo pipeline up to sampling, shrunk, with a marker in its environment that every process
it starts inherits; it is SIGKILLed once its temporary server and a Dask worker process are both alive.
Slow (a real pipeline run up to sampling): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.e2e._service import MARKER, marked

BIN = Path(sys.executable).parent


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.slow
def test_a_killed_cli_leaves_no_server_dask_or_loader_process(tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the CLI's own temporary server
    sets = ["source.limit=120", "transform.epochs=3", "cluster.k=5", "embed.num_workers=2",
            "sample.n_train=2000000", "sample.shard_size=20000", "human.proxy_n_triplets=3000"]
    cli = subprocess.Popen([str(BIN / "alignet"), "sample", "--root", str(tmp_path / "data"),
                            *[a for s in sets for a in ("--set", s)]], env=env, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "cli.log", "w"))
    seen: set[str] = set()
    try:
        deadline = time.time() + 900
        while time.time() < deadline and cli.poll() is None:
            cmds = [_cmd(p) for p in marked(marker)]
            seen |= {"server" for c in cmds if "uvicorn" in c} | {"dask" for c in cmds if "multiprocessing" in c}
            if {"server", "dask"} <= seen and any("multiprocessing" in c for c in cmds):
                break
            time.sleep(1)
        assert cli.poll() is None, "the run ended before its Dask workers were seen:\n" + (
            tmp_path / "cli.log").read_text()[-3000:]
        assert {"server", "dask"} <= seen, (tmp_path / "cli.log").read_text()[-3000:]
        before = [f"{p.pid} {_cmd(p)[:120]}" for p in marked(marker) if p.pid != cli.pid]
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)
        deadline = time.time() + 30
        while (left := marked(marker)) and time.time() < deadline:
            time.sleep(1)
        assert left == [], (f"still alive 30 s after kill -9 of the CLI: {[_cmd(p)[:150] for p in left]}; "
                            f"alive at the kill: {before}")
    finally:
        if cli.poll() is None:
            cli.kill()
        for proc in marked(marker):
            proc.kill()

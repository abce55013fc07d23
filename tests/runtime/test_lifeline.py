"""alignet_core/runtime/lifeline.py: after a SIGKILL of the process that started the watchdog, its
children die too, the one in a session of its own (as Prefect starts flow-run engines) and the grandchild
re-parented to init included; a process that does not carry the token and was never a descendant lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from alignet_core.runtime.lifeline import start_watchdog
    start_watchdog()
    # a child in a session of its own that starts a grandchild and exits (the grandchild is re-parented)
    subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                      "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
                      "print(p.pid, flush=True)"], start_new_session=True, stdout=sys.stdout)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    print("ready", flush=True)
    time.sleep(300)
""")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_children_die_with_a_killed_parent_and_strangers_live():
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        lines = {parent.stdout.readline().strip(), parent.stdout.readline().strip()}
        assert "ready" in lines
        grandchild = int((lines - {"ready"}).pop())
        time.sleep(1.5)  # the watchdog notes descendants once a second
        children = [c.pid for c in psutil.Process(parent.pid).children(recursive=True)]
        assert len(children) >= 2 and psutil.pid_exists(grandchild)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone([*children, grandchild], timeout=20) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        if parent.poll() is None:
            parent.kill()

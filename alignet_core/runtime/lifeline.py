"""A lifeline: no process a pipeline (or `make serve`) started outlives it, even after a SIGKILL.

`start_watchdog()` gives this process a fresh token in `ALIGNET_LIFELINE` (inherited by every process it
starts: Prefect's temporary server, Dask workers, flow-run engines, torchrun) and starts a small watchdog in
its own session. The watchdog waits for the process to exit (a Linux pidfd: no polling of the exit), noting
its descendants once a second meanwhile; when it is gone (a normal exit, a crash or `kill -9`), it
terminates every noted descendant still alive and every process that carries the token, even one that
started a session of its own (Prefect runs each flow-run engine in one) or was re-parented: SIGTERM, then
SIGKILL after `GRACE` seconds. Forked children that never exec'd (DataLoader workers) are covered by the
snapshots. Standard library and psutil only: the watchdog loads none of the pipeline.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)

#: the environment variable that carries a lifeline's token to every descendant
ENV = "ALIGNET_LIFELINE"
#: seconds between SIGTERM and SIGKILL when the watchdog reaps
GRACE = 5.0


def start_watchdog(pid: int | None = None, token: str | None = None) -> str:
    """Tie every process `pid` (default: this one) starts from now on to its lifetime; return the token.

    Sets `ALIGNET_LIFELINE` in this process's environment (a fresh token unless one is given) and starts
    the watchdog, detached in its own session so that a Ctrl-C to the terminal does not stop it first."""
    pid = os.getpid() if pid is None else pid
    token = token or f"{pid}-{secrets.token_hex(8)}"
    os.environ[ENV] = token
    subprocess.Popen([sys.executable, "-m", __name__, str(pid), token], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)
    return token


def carriers(token: str) -> list[psutil.Process]:
    """Every process of this user (but this one) whose environment carries `token` in `ALIGNET_LIFELINE`."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(ENV) == token:
                out.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, or another user's: not ours to reap
    return out


def reap(procs: list[psutil.Process], grace: float = GRACE) -> list[psutil.Process]:
    """SIGTERM `procs` (those still alive: psutil checks each pid's start time), wait up to `grace`
    seconds, SIGKILL the rest; return the ones that were still alive at the start."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.pid != os.getpid():
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=grace)
    return alive


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """True once `pid` has exited; waits at most `timeout` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux ≥ 5.3, or already gone
        if not psutil.pid_exists(pid):
            return True
        time.sleep(timeout)
        return not psutil.pid_exists(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def watch(pid: int, token: str, every: float = 1.0) -> int:
    """Wait for `pid` to exit, noting its descendants every `every` seconds; then reap the noted ones
    still alive and every carrier of `token`. Returns how many processes were reaped."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        parent = None
    noted: dict[int, psutil.Process] = {}
    while parent is not None:
        try:
            for child in parent.children(recursive=True):
                noted.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        if _wait_for_exit(pid, every):
            break
    procs = {p.pid: p for p in [*noted.values(), *carriers(token)]}
    return len(reap(list(procs.values())))


def main(argv: list[str] | None = None) -> int:
    """`python -m alignet_core.runtime.lifeline PID TOKEN`: the watchdog (started by `start_watchdog`,
    or by `scripts/serve.sh` for itself)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit():
        print("usage: python -m alignet_core.runtime.lifeline PID TOKEN", file=sys.stderr)
        return 2
    watch(int(args[0]), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

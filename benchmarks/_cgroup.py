"""Peak memory of a benchmark as the kernel charges it, from a memory cgroup the process joins.

Summed RSS counts a page that several processes map (a memory-mapped store, a shared library)
once per process; PSS splits it between them; neither counts page cache that no process maps.
A memory cgroup charges every page, private memory and page cache alike, once to the group and
records the group's peak: what a container's memory limit enforces. `MemoryCgroup.join` needs a
writable memory controller (cgroup v1, or v2 with `memory` enabled below this process's group,
and a kernel that can reset `memory.peak`): root in most containers. Elsewhere it returns None
and the benchmark reports no cgroup figure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A child memory cgroup holding this process and every process it starts after joining."""

    def __init__(self, path: Path, parent: Path, peak_file: str) -> None:
        self.path, self._parent, self._peak_file = path, parent, peak_file

    @classmethod
    def join(cls, name: str) -> "MemoryCgroup | None":
        """Create `<own memory cgroup>/<name>-<pid>` and move this process into it; None where not possible."""
        found = _own_memory_cgroup()
        if found is None:
            return None
        parent, peak_file = found
        path = parent / f"{name}-{os.getpid()}"
        try:
            path.mkdir()
            (path / "cgroup.procs").write_text(str(os.getpid()))
            group = cls(path, parent, peak_file)
            group.reset_peak()
        except OSError as err:
            log.info("no memory cgroup for the benchmark (%s)", err)
            if path.exists():
                _leave(path, parent)
            return None
        return group

    def reset_peak(self) -> None:
        """Start a new peak from the group's current usage."""
        (self.path / self._peak_file).write_text("0")

    def peak_bytes(self) -> int:
        """Highest memory charged to the group since it was joined or last reset."""
        return int((self.path / self._peak_file).read_text())

    @property
    def v1(self) -> bool:
        return self._peak_file == "memory.max_usage_in_bytes"

    def set_limit(self, limit_bytes: int) -> None:
        """Cap the group's memory as a container's limit does: past it the kernel reclaims page cache, and
        kills (OOM) only when anonymous memory alone exceeds it."""
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit_bytes))

    def limit_events(self) -> dict[str, int]:
        """How often usage reached the limit (reclaim ran) and how many processes the kernel OOM-killed."""
        if self.v1:
            control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
            return {"limit_hits": int((self.path / "memory.failcnt").read_text()),
                    "oom_kills": int(control.get("oom_kill", 0))}
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return {"limit_hits": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}

    def leave(self) -> None:
        """Move this process back to the parent group and remove this one (its children must have exited)."""
        _leave(self.path, self._parent)


def _own_memory_cgroup() -> tuple[Path, str] | None:
    """(this process's memory cgroup folder, its peak file) under cgroup v1 or v2, if writable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            folder = CGROUP_ROOT / "memory" / rel.lstrip("/")
            if os.access(folder, os.W_OK):
                return folder, "memory.max_usage_in_bytes"
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            folder = CGROUP_ROOT / rel.lstrip("/")
            try:
                enabled = (folder / "cgroup.subtree_control").read_text().split()
            except OSError:
                return None
            if "memory" in enabled and os.access(folder, os.W_OK):
                return folder, "memory.peak"
    return None


def _leave(path: Path, parent: Path, wait_s: float = 10.0) -> None:
    """Move every process in `path` (this one, and helpers it started that outlive a run, such as
    multiprocessing's resource tracker) to `parent`, then remove `path`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    (parent / "cgroup.procs").write_text(pid)
            path.rmdir()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                log.warning("could not remove the benchmark's cgroup %s (%s)", path, err)
                return
            time.sleep(0.2)

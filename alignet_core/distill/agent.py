"""torchrun's agent, tied to the process that started it, so that a killed stage leaves no orphan ranks.

`python -m alignet_core.distill.agent <torchrun arguments>` is torchrun (`torch.distributed.run`) in a
process that the kernel kills when its parent dies (Linux `PR_SET_PDEATHSIG`), even by SIGKILL, when no
cleanup code can run. Each rank asks the same of the agent (`die_with_parent` in `launch`), so the chain
stage → agent → ranks unwinds on its own whichever link is killed. Module-level imports are the
standard library only: the agent process never loads torch's models or this package's numerics.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

#: set by the stage's launcher to its own pid: the parent the agent must outlive no longer than
PARENT_ENV = "ALIGNET_DISTILL_PARENT"
#: set by the agent to its pid, inherited by the ranks it starts: their parent
AGENT_ENV = "ALIGNET_DISTILL_AGENT"

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: str | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere only a debug line).

    expected_parent: the parent's pid as a string (from the environment), or None. If the parent is
    already gone (this process was re-parented before the request took effect), exit at once."""
    if not sys.platform.startswith("linux"):
        log.debug("die_with_parent: not Linux; a killed parent may leave this process running")
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("die_with_parent: prctl(PR_SET_PDEATHSIG) failed with errno %d", ctypes.get_errno())
        return
    if expected_parent is not None and str(os.getppid()) != str(expected_parent):
        os._exit(1)  # the parent died before the request: nothing to train for


def main() -> None:
    """Run torchrun with the command line's arguments, dying with this process's parent."""
    die_with_parent(os.environ.get(PARENT_ENV))
    os.environ[AGENT_ENV] = str(os.getpid())
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()

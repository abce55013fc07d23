"""glibc's malloc thresholds (`alignet_core.runtime.malloc`): with them a freed large buffer is reused, without
them every new one faults its pages in again. Each case runs in a fresh interpreter (the settings are the
process's) and counts the minor page faults of ten 200 MB buffers made, written and freed in turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np

    how = sys.argv[1]
    if how == "stage":
        from alignet_core.runtime.malloc import STAGE_PROCESS, set_malloc_thresholds
        took = set_malloc_thresholds(STAGE_PROCESS)
    elif how == "cli":
        import os
        from flows.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        took = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # what the processes it starts inherit
    else:
        took = None

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def buffer() -> None:
        a = np.ones(25_000_000)  # 200 MB, every page written
        del a

    f0 = faults(); buffer(); first = faults() - f0
    f0 = faults()
    for _ in range(9):
        buffer()
    print(json.dumps({"took": took, "first": first, "next_nine": faults() - f0}))
""")


def _faults(how: str, **env: str) -> dict:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "ALIGNET_MALLOC"}
    out = subprocess.run([sys.executable, "-c", CHILD, how], capture_output=True, text=True, check=True,
                         env={**inherited, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_stage_thresholds_reuse_a_freed_large_buffer_and_glibcs_defaults_do_not() -> None:
    plain = _faults("plain")
    assert plain["next_nine"] >= 5 * plain["first"]  # the defaults: each new buffer faults in again
    reused = _faults("stage")
    assert reused["took"] is True
    assert reused["first"] > 0 and reused["next_nine"] <= reused["first"] // 10


def test_the_cli_sets_them_before_anything_runs_and_passes_them_on() -> None:
    reused = _faults("cli")
    assert reused["next_nine"] <= reused["first"] // 10
    assert reused["took"] == str(2**30)


def test_a_process_started_with_the_cli_environment_reuses_buffers_too() -> None:
    from alignet_core.runtime.malloc import STAGE_PROCESS, child_environment

    started = _faults("plain", **child_environment(STAGE_PROCESS))
    assert started["next_nine"] <= started["first"] // 10


def test_alignet_malloc_default_leaves_glibc_as_it_is() -> None:
    off = _faults("stage", ALIGNET_MALLOC="default")
    assert off["took"] is False
    assert off["next_nine"] >= 5 * off["first"]

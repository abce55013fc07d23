"""benchmarks/malloc.py: a kernel run in a fresh process under each setting (no timing asserted), and what the
two settings change in its page faults."""

from __future__ import annotations

import sys

import pytest

from benchmarks.malloc import _kernel, _medians

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def test_a_kernel_runs_under_both_settings_and_the_stage_setting_faults_less() -> None:
    runs = {s: _kernel(s, "student_steps", 2) for s in ("glibc_default", "stage_process")}
    for run in runs.values():
        assert set(run) == {"wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mib"} and run["wall_s"] > 0
    assert runs["stage_process"]["minor_faults"] < runs["glibc_default"]["minor_faults"]
    assert _medians([runs["glibc_default"], runs["stage_process"]])["wall_s"] > 0

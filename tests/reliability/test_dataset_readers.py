"""Readers of published dataset versions are not deleted under (issue 34): a version a reader holds
(`versions.reading`, which `verify`, `manifest` and the CLI's `datasets` commands take) is left by
retention for the next one, and a reader that resolved a version retention then removed finds it gone
whole and resolves `latest` again, never a half-deleted version reported as corrupt.

Before: with `keep_versions: 1` and two publishers, 32 of 79 concurrent verify calls found files missing
and 1 of 6 `alignet datasets verify` runs exited 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from alignet_core.sample import versions
from tests.sample.test_versions import _publish

REPO = Path(__file__).resolve().parents[2]


def test_retention_leaves_a_version_a_reader_holds(tmp_path):
    """Step by step: a reader holds v1 (no longer `latest`) while v2 is promoted with keep_versions 1: v1
    stays whole and verifies; once the reader lets go the next retention removes it."""
    root = str(tmp_path)
    _publish(tmp_path, "v1", 1)
    versions.promote(root, "demo", "v1", 1)
    _publish(tmp_path, "v2", 2)
    with versions.reading(root, "demo") as held:
        assert held == "v1"
        assert versions.promote(root, "demo", "v2", 1) == []  # v1 is held: left for the next retention
        assert versions.verify(root, "demo", "v1") == []
        assert versions.read_latest(root, "demo") == "v2"
    assert versions.promote(root, "demo", "v2", 1) == ["v1"]
    assert [r["version"] for r in versions.list_versions(root, "demo")] == ["v2"]
    assert not (tmp_path / "datasets/demo/.readers/v1.lock").exists()



def test_retention_leaves_the_version_a_distillation_trains_on(tmp_path):
    """The distill stage holds the published version it trains on (`io.version_locks.shared_hold`, the lock
    `reading` takes; the ranks read its files again) for the whole training: a regeneration's retention in
    the meantime leaves it; the hold is taken on the version the sample stage's output names."""
    from types import SimpleNamespace

    from alignet_core.config import parse_config
    from alignet_core.distill.stage import distill_files
    from alignet_core.io import version_locks

    root = str(tmp_path)
    _publish(tmp_path, "v1", 1)
    versions.promote(root, "demo", "v1", 1)
    cfg = parse_config({"root": root, "distill": {"sampling": "between_class"}})
    own = SimpleNamespace(key="k", artifact=str(tmp_path / "datasets/demo/v1/uncertainty_distillation"),
                          metrics=SimpleNamespace(version="v1"))
    files = distill_files(cfg, own)
    assert files.version == "v1"
    _publish(tmp_path, "v2", 2)
    with version_locks.shared_hold(root, "demo", files.version):
        assert versions.promote(root, "demo", "v2", 1) == []  # v1 is being trained on: left
        assert versions.verify(root, "demo", "v1") == []
    assert versions.promote(root, "demo", "v2", 1) == ["v1"]

PUBLISHER = """
import sys
from pathlib import Path
from tests.sample.test_versions import _publish
from alignet_core.sample import versions
root, who = Path(sys.argv[1]), sys.argv[2]
for i in range(8):
    v = f"{who}{i}"
    p = versions.pin(str(root), "demo", v)
    _publish(root, v, i % 3 + 1)
    versions.promote(str(root), "demo", v, 1, p)
"""

VERIFIER = """
import contextlib, io, json, sys
from alignet_core.sample import versions
from flows.cli import main
import os, time
root, done = sys.argv[1], [sys.argv[2], sys.argv[3]]
calls, bad, cli, cli_bad, t0 = 0, [], 0, [], time.monotonic()
while (not all(os.path.exists(d) for d in done) or calls < 20) and time.monotonic() - t0 < 400:
    try:
        problems = versions.verify(root, "demo")
    except Exception as err:  # a reader must never fail on a version retention removes
        problems = [f"{type(err).__name__}: {err}"]
    calls += 1
    if problems:
        bad.append(problems)
    if calls % 4 == 0:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["datasets", "verify", "--root", root])
        cli += 1
        if code != 0:
            cli_bad.append([code, out.getvalue()[-500:]])
print(json.dumps({"calls": calls, "bad": bad[:5], "n_bad": len(bad), "cli": cli, "cli_bad": cli_bad[:5]}))
"""


def test_verify_never_sees_a_half_retained_version(tmp_path):
    """Two publishers promote eight versions each with keep_versions 1 while a third process verifies
    `latest` over and over, through the library and the CLI: every call finds an intact version."""
    root = tmp_path / "root"
    _publish(root, "seed", 1)
    versions.promote(str(root), "demo", "seed", 1)
    flags = [tmp_path / "a.done", tmp_path / "b.done"]
    verifier = subprocess.Popen([sys.executable, "-c", VERIFIER, str(root), *map(str, flags)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    publishers = [subprocess.Popen([sys.executable, "-c", PUBLISHER + f"\nPath({str(flag)!r}).touch()\n", str(root), who],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for who, flag in zip("ab", flags)]
    outs = [p.communicate(timeout=600)[0] for p in publishers]
    out, err = verifier.communicate(timeout=600)  # it stops once both publishers are done (400 s at most)
    assert [p.returncode for p in publishers] == [0, 0], outs
    assert verifier.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    print(result["calls"], "verify calls,", result["cli"], "CLI runs")
    assert result["n_bad"] == 0 and result["cli_bad"] == [], result
    assert result["calls"] >= 20 and result["cli"] >= 5, result
    left = versions.list_versions(str(root), "demo")
    assert len(left) >= 1 and sum(r["latest"] for r in left) == 1 and versions.verify(str(root), "demo") == []

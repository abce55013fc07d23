"""Dataset versions: publication layout, `latest`, retention, list/show/verify (library and CLI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from alignet_core.errors import InputError, StoreError
from alignet_core.sample import versions
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import ShardSpec, _write_npz_atomic, shard_path
from flows.cli import main

NAMES = {"between_class": "between_class"}


def _publish(root: Path, version: str, seed: int) -> dict:
    """A real (tiny) version: one shard per split assembled into the official layout."""
    work = root / "work" / version
    (work / "shards").mkdir(parents=True)
    g = np.random.default_rng(seed)
    specs = []
    for split, n in (("train", 40), ("valid", 10)):
        spec = ShardSpec(strategy="between_class", split=split, index=0, n=n, seed=seed)
        idx = np.stack([g.choice(30, 3, replace=False) for _ in range(n)])
        sims = np.sort(g.normal(size=(n, 3)), axis=1)[:, ::-1].astype(np.float32)
        _write_npz_atomic(shard_path(str(work), spec), indices=idx, similarities=sims,
                                  n_requested=np.int64(n), n_ties=np.int64(0))
        specs.append(spec)
    ids = np.array([f"img{i:03d}" for i in range(30)])
    return assemble_dataset(str(work), specs, ids, versions.version_dir(str(root), "demo", version), NAMES,
                                    subfolder="uncertainty_distillation",
                                    extra={"version": version, "published_at": f"2026-11-2{seed}T00:00:00+00:00"})


def test_versions_latest_retention_and_verify(tmp_path):
    root = str(tmp_path)
    assert versions.list_datasets(root) == [] and versions.read_latest(root, "demo") is None
    with pytest.raises(InputError, match="no published version"):
        versions.resolve(root, "demo")
    m = _publish(tmp_path, "aaa", 1)
    assert m["files"]["train_between_class.npz"]["path"] == "uncertainty_distillation/train_between_class.npz"
    assert (tmp_path / "datasets/demo/aaa/uncertainty_distillation/valid_between_class.npz").exists()
    assert (tmp_path / "datasets/demo/aaa/manifest.json").exists()
    _publish(tmp_path, "bbb", 2)
    _publish(tmp_path, "ccc", 3)
    (tmp_path / "datasets/demo/.tmp-half-written").mkdir()  # debris is never a version
    with pytest.raises(StoreError, match="not a published version"):
        versions.set_latest(root, "demo", ".tmp-half-written")

    versions.set_latest(root, "demo", "aaa")
    listed = versions.list_versions(root, "demo")
    assert [r["version"] for r in listed] == ["aaa", "bbb", "ccc"]  # oldest first
    assert [r["latest"] for r in listed] == [True, False, False]
    assert listed[0]["n_triplets"] == sum(f["n_triplets"] for f in m["files"].values()) > 40
    assert versions.manifest(root, "demo")["version"] == "aaa"
    assert versions.verify(root, "demo", "bbb") == []

    # retention keeps the newest `keep` and never the version `latest` points at
    assert versions.apply_retention(root, "demo", None) == []
    assert versions.apply_retention(root, "demo", 1) == ["bbb"]
    assert [r["version"] for r in versions.list_versions(root, "demo")] == ["aaa", "ccc"]
    assert not any(p.name.startswith(".trash") for p in (tmp_path / "datasets/demo").iterdir())

    # verify recomputes checksums
    f = tmp_path / "datasets/demo/ccc/uncertainty_distillation/train_between_class.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert versions.verify(root, "demo", "ccc") == ["uncertainty_distillation/train_between_class.npz: sha256 "
                                                    "differs from the manifest"]
    os.remove(tmp_path / "datasets/demo/ccc/uncertainty_distillation/valid_between_class.npz")
    assert "uncertainty_distillation/valid_between_class.npz: missing" in versions.verify(root, "demo", "ccc")
    with pytest.raises(InputError, match=r"no version 'zzz'; versions: \['aaa', 'ccc'\]"):
        versions.verify(root, "demo", "zzz")


def test_datasets_cli_lists_shows_and_verifies(tmp_path, capsys):
    _publish(tmp_path, "v1", 1)
    _publish(tmp_path, "v2", 2)
    versions.set_latest(str(tmp_path), "demo", "v2")
    assert main(["datasets", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("demo  v1  ") and out[1].endswith("(latest)") and " triplets in 2 files" in out[1]
    assert main(["datasets", "show", "demo", "--root", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v2"
    assert main(["datasets", "verify", "--root", str(tmp_path)]) == 0
    assert "ok: dataset demo version v2: 2 files" in capsys.readouterr().out
    f = tmp_path / "datasets/demo/v1/uncertainty_distillation/valid_between_class.npz"
    f.write_bytes(b"tampered")
    assert main(["datasets", "verify", "demo", "--version", "v1", "--root", str(tmp_path)]) == 1
    assert "FAILED uncertainty_distillation/valid_between_class.npz" in capsys.readouterr().out
    assert main(["datasets", "show", "nope", "--root", str(tmp_path)]) == 2
    assert "error: dataset 'nope' has no published version" in capsys.readouterr().err


def test_datasets_verify_checks_the_version_it_names_while_latest_moves(tmp_path, capsys, monkeypatch):
    """`latest` promoted to a tampered v2 between reading the manifest and hashing its files: the command
    verifies and names v1, the version it resolved, not one version's files under another's name."""
    _publish(tmp_path, "v1", 1)
    _publish(tmp_path, "v2", 2)
    versions.set_latest(str(tmp_path), "demo", "v1")
    (tmp_path / "datasets/demo/v2/uncertainty_distillation/valid_between_class.npz").write_bytes(b"tampered")
    real_manifest = versions.manifest

    def manifest_then_promote(root: str, name: str, version: str = versions.LATEST) -> dict:
        m = real_manifest(root, name, version)
        versions.set_latest(root, name, "v2")  # a regeneration finishing at this moment
        return m

    monkeypatch.setattr(versions, "manifest", manifest_then_promote)
    assert main(["datasets", "verify", "--root", str(tmp_path)]) == 0
    assert "ok: dataset demo version v1: 2 files" in capsys.readouterr().out


def test_latest_versions_and_manifest_entries_are_confined_to_the_dataset(tmp_path, capsys):
    """A `latest` naming `../../../outside`, a `--version ../x` and a manifest entry naming a file
    outside the version folder are refused; the outside file is never hashed (no `ok`)."""
    root = tmp_path / "root"
    _publish(root, "v1", 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"files": {}, "complete": True}))
    latest = root / "datasets/demo/latest"
    latest.write_text(json.dumps({"version": "../../../outside"}))
    with pytest.raises(StoreError, match="does not name a version of this dataset"):
        versions.verify(str(root), "demo")
    assert main(["datasets", "verify", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "ok:" not in err

    versions.set_latest(str(root), "demo", "v1")
    for bad in ("../../../outside", "/etc", ".hidden", "v1/../../x"):
        with pytest.raises(InputError, match="version: .* not a plain folder name"):
            versions.resolve(str(root), "demo", bad)
        assert main(["datasets", "verify", "--version", bad, "--root", str(root)]) == 2
        assert "not a plain folder name" in capsys.readouterr().err

    m = json.loads((root / "datasets/demo/v1/manifest.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the dataset")
    m["files"]["train_between_class.npz"]["path"] = "../../../../secret.txt"
    m["files"]["valid_between_class.npz"]["path"] = str(secret)
    (root / "datasets/demo/v1/manifest.json").write_text(json.dumps(m))
    problems = versions.verify(str(root), "demo")
    assert problems == ["../../../../secret.txt: points outside the version folder; not read",
                        f"{secret}: points outside the version folder; not read"]
    assert main(["datasets", "verify", "--root", str(root)]) == 1
    assert "ok:" not in capsys.readouterr().out


def test_retention_never_deletes_a_version_another_run_is_promoting(tmp_path):
    """The issue's interleaving, step by step: run A plans (pins) and publishes v1; run B publishes v2
    and promotes it with keep_versions 1; A's v1 survives B's retention and A's promotion succeeds."""
    root = str(tmp_path)
    pin_a = versions.pin(root, "demo", "v1")
    _publish(tmp_path, "v1", 1)
    pin_b = versions.pin(root, "demo", "v2")
    _publish(tmp_path, "v2", 2)
    assert versions.promote(root, "demo", "v2", 1, pin_b) == []  # v1 is pinned by A
    assert versions.promote(root, "demo", "v1", 1, pin_a) == []  # v2 is the newest: kept
    assert versions.read_latest(root, "demo") == "v1"
    assert not list((tmp_path / "datasets/demo/.pins").iterdir())
    assert versions.promote(root, "demo", "v2", 1) == ["v1"]  # no pin left: retention works again
    with pytest.raises(InputError, match="not a plain folder name"):
        versions.pin(root, "demo", "../v3")


RACER = """
import sys
from tests.sample.test_versions import _publish
from alignet_core.sample import versions
from pathlib import Path
root, who = Path(sys.argv[1]), sys.argv[2]
for i in range(6):
    v = f"{who}{i}"
    p = versions.pin(str(root), "demo", v)
    _publish(root, v, i % 3 + 1)
    versions.promote(str(root), "demo", v, 1, p)
"""


def test_two_publishers_racing_with_keep_versions_1_never_fail(tmp_path):
    """Two processes publish and promote six versions each on one dataset name with keep_versions 1:
    promotion and retention are serialized by the dataset lock and pins, so neither fails and what is
    left is `latest` (intact) plus at most the other run's newest version."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), who], cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for who in ("a", "b")]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    left = versions.list_versions(str(tmp_path), "demo")
    assert 1 <= len(left) <= 2 and sum(r["latest"] for r in left) == 1
    assert versions.verify(str(tmp_path), "demo") == []

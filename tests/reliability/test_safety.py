"""Safety: no file a user hands in is ever unpickled, and no path read from a manifest, file list,
tar shard or config leaves its declared root."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from alignet_core.config import parse_config
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import formats, store
from alignet_core.models import factory as models
from alignet_core.transform import affine
from tests.reliability.stage_runner import run_until
from tests.reliability.test_stage_kills import _cfg

REPO = Path(__file__).resolve().parents[2]


class Canary:
    """Unpickling this creates a folder: proof that a loader ran code from a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the pickle is the point
def test_pickled_weights_are_refused_without_running_them(tmp_path: Path) -> None:
    canary = tmp_path / "ran"
    torch.save({"conv.weight": torch.zeros(1), "evil": Canary(str(canary))}, tmp_path / "w.pth")
    with pytest.raises(InputError, match=r"weights: cannot read .*w.pth"):
        models.load_state_dict(str(tmp_path / "w.pth"))
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Canary(str(canary)), f)
    with pytest.raises(InputError, match="raw.pkl"):
        models.load_state_dict(str(tmp_path / "raw.pkl"))
    assert not canary.exists()


def test_pickled_arrays_are_refused_without_running_them(tmp_path: Path) -> None:
    canary = tmp_path / "ran"
    evil = np.empty((2, 3), dtype=object)
    evil[:] = Canary(str(canary))
    np.save(tmp_path / "t.npy", evil, allow_pickle=True)
    with pytest.raises(InputError, match="t.npy"):
        formats.read_things_triplets(str(tmp_path / "t.npy"))
    with pytest.raises(InputError, match="t.npy: not a .npy array"):
        formats.read_probabilities(str(tmp_path / "t.npy"), 2)
    np.savez(tmp_path / "d.npz", indices=np.array([[0, 1, 2]]), filenames=evil[:1],
             similarities=np.array([[1.0, 0.0, 0.0]]))
    with pytest.raises(InputError, match="Python objects, refused"):
        formats.read_alignet_npz(str(tmp_path / "d.npz"))
    with open(tmp_path / "pickle.npz", "wb") as f:  # a bare pickle named like a dataset
        pickle.dump(Canary(str(canary)), f)
    with pytest.raises(InputError, match="pickle.npz: not a readable AligNet .npz file"):
        formats.read_alignet_npz(str(tmp_path / "pickle.npz"))
    assert not canary.exists()


def test_transform_files_are_safetensors_and_a_bad_one_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "t.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="t.safetensors: not a safetensors transform file"):
        affine.AffineTransform.load(str(tmp_path / "t.safetensors"))


LOADERS = re.compile(r"\b(pickle|cloudpickle|dill|joblib)\.loads?\(|\btorch\.load\(|\bnp\.load\(")


def test_no_loader_in_the_code_can_unpickle() -> None:
    """Every np.load passes allow_pickle=False, every torch.load weights_only=True; no pickle loads."""
    offenders = []
    for folder in ("alignet_core", "tasks", "flows"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                m = LOADERS.search(line)
                if not m:
                    continue
                call = m.group(0)
                safe = ("allow_pickle=False" in line if call.startswith("np.load")
                        else "weights_only=True" in line if call.startswith("torch.load") else False)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_a_manifest_pointing_outside_the_root_is_refused(tmp_path: Path, one_torch_thread: None) -> None:
    root = tmp_path / "root"
    cfg = _cfg(root)
    out = run_until(cfg, "embed")
    manifest = Path(out.dir) / store.MANIFEST
    good = json.loads(manifest.read_text())
    for artifact in ("/etc", str(root / ".." / "elsewhere.zarr"), "file:///etc"):
        manifest.write_text(json.dumps({**good, "artifact": artifact}))
        with pytest.raises(StoreError, match=rf"{re.escape(str(manifest))}.*an artifact inside the root"):
            run_until(cfg, "embed")
    manifest.write_text(json.dumps({**good, "key": "0" * 20}))  # a manifest copied from another stage
    with pytest.raises(StoreError, match="expected stage 'embed', key"):
        run_until(cfg, "embed")
    manifest.write_text(json.dumps(good))
    assert run_until(cfg, "embed") == out


def test_dataset_name_cannot_leave_the_root() -> None:
    for name in ("../../etc", "/abs", "a/b", ".hidden", ""):
        with pytest.raises(ConfigError, match="dataset_name"):
            parse_config({"dataset_name": name})
    assert parse_config({"dataset_name": "things-v1.2_b"}).dataset_name == "things-v1.2_b"

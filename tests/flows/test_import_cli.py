"""`alignet validate` on imported embeddings: a bad array is one line naming the field, exit 2; a good
.npy is checked (rows scanned, sha256 taken) without importing torch, timm, Prefect, Dask or Zarr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np


def _write(folder: Path, nan_row: int | None = None) -> Path:
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    if nan_row is not None:
        x[nan_row, 2] = np.nan
    np.save(folder / "emb.npy", x)
    (folder / "ids.txt").write_text("".join(f"a{i}\n" for i in range(50)))
    (folder / "labels.txt").write_text("".join(f"c{i % 3}\n" for i in range(50)))
    cfg = folder / "cfg.yaml"
    cfg.write_text(f"root: {folder / 'root'}\ndevice: cpu\ncluster: {{k: 3}}\n"
                   f"source: {{kind: embeddings, path: {folder / 'emb.npy'}, ids: {folder / 'ids.txt'}, "
                   f"labels: {folder / 'labels.txt'}}}\n")
    return cfg


PROBE = ("import sys; from flows.cli import main; rc = main(['validate', '--config', {cfg!r}]); "
         "print(rc, sorted(m for m in ('torch', 'timm', 'torchvision', 'prefect', 'dask', 'zarr') if m in sys.modules))")


def test_validate_checks_an_npy_without_heavy_imports(tmp_path: Path) -> None:
    cfg = _write(tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", PROBE.format(cfg=str(cfg))], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.stdout.strip().splitlines()[-1] == "0 []", (res.stdout, res.stderr)


def test_validate_refuses_a_nan_row_in_one_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, nan_row=17)
    res = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=300, env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: source.path: ") and "1 row(s) hold NaN" in res.stderr and "17 (id 'a17')" in res.stderr

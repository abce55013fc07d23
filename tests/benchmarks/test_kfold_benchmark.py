"""benchmarks.kfold at a small size: the real transform stage in a child process over a generated THINGS-format
file; the record says what share each fold trained on, that every object was tested once, and the memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import kfold


@pytest.mark.slow
def test_kfold_benchmark_records_the_rotation(tmp_path):
    out = tmp_path / "kfold.json"
    kfold.main(["--work", str(tmp_path / "work"), "--n-triplets", "200000", "--dim", "16", "--epochs", "1",
                "--out", str(out)])
    r = json.loads(out.read_text())
    rot = r["rotation"]
    assert rot["n_triplets"] == 200000 and rot["folds"] == 5 and len(r["folds"]) == 5
    assert abs(rot["train_share"] - 0.512 * 0.9) < 0.02  # 10% early-stopping rows at this size (cap not reached)
    assert r["heldout_objects"] == 1854 and r["claims"]["heldout_covers_every_object_once"]
    assert rot["test"] == sum(f["test_triplets"] for f in r["folds"]) == r["heldout"]["transformed"]["n"]
    assert rot["test"] + rot["partial"] == 200000
    assert r["refit"]["n_triplets"] == 200000 and r["teacher"] == "heldout"
    assert 0 < r["peak_rss_gib"] < 8 and np.isfinite(r["transform_seconds"])
    assert r["machine"]

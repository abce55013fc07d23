"""benchmarks/listing.py measures a real generated tree (small here; no timing is asserted, only that each
is a measurement and every file was listed)."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.listing import make_tree, measure


def test_measure_lists_every_generated_file(tmp_path: Path) -> None:
    assert make_tree(tmp_path / "images", 2500, 1000) > 0
    row = measure(tmp_path / "images", repeats=1)
    assert row["files"] == 2500
    for key in ("list_s", "digest_s", "listing_s", "fsspec_find_s"):
        assert math.isfinite(row[key]) and row[key] >= 0, (key, row[key])
    assert row["listing_s"] >= row["list_s"]

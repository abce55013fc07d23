"""benchmarks/stage_integrity.py measures real stage files (tiny here; no timing is asserted, only that each is a
measurement) and removes what it wrote."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.stage_integrity import main


def test_each_stage_is_written_hashed_and_checked(tmp_path: Path) -> None:
    result = main(["--rows", "5000", "--dim", "32", "--triplets", "20000", "--k", "10", "--chunk-rows", "1024",
                   "--repeats", "1", "--root", str(tmp_path), "--no-write"])
    cases = {c["stage"]: c for c in result["cases"]}
    assert cases["transform"]["files"] >= 5 + 2  # five embedding chunks, the valid and ids arrays, metadata
    assert cases["cluster"]["files"] == 4 and cases["sample"]["files"] == 1
    for c in cases.values():
        for key in ("write_s", "hash_s", "size_check_s", "verify_s"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["stage"], key)
    assert list(tmp_path.iterdir()) == []  # everything removed

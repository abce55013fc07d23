"""benchmarks/publish_split.py quick end to end: every part of publishing a split timed, both ways of
publishing two splits timed (no timing asserted)."""

from __future__ import annotations

from benchmarks.publish_split import main


def test_quick_run_times_every_part_and_both_ways(tmp_path) -> None:
    r = main(["--quick", "--no-write", "--dir", str(tmp_path)])
    assert len(r["parts_seconds"]) == 8 and all(v >= 0 for v in r["parts_seconds"].values())
    assert set(r["two_splits_seconds"]) == {"sequential", "two_threads"}
    assert all(v > 0 for v in r["two_splits_seconds"].values())
    assert list(tmp_path.iterdir()) == []  # its files removed

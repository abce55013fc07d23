"""benchmarks/store_read.py measures real stores (small here; no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.store_read import measure


def test_measure_reports_sizes_and_read_times_of_both_layouts(tmp_path: Path) -> None:
    row = measure(20480, 64, "float16", "relu", 2048, str(tmp_path))
    assert row["raw_mib"] > row["zstd_mib"] > 0  # half the entries are zero: zstd must shrink it
    assert row["raw_mib"] == 2.5  # raw: 10 chunks of 2048 × 64 float16, bytes as they are
    assert min(row["raw_read_s"], row["zstd_read_s"], row["raw_chunk_reader_s"]) >= 0
    assert 0 < row["size_saved"] < 1
    assert list(tmp_path.iterdir()) == []  # stores removed

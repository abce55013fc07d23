"""benchmarks/store_read.py measures real stores (small here; no timing is asserted, only that each is a
measurement: positive and finite) and each way of reading read the whole store, as it was written."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from benchmarks.store_read import make_rows, measure

WAYS = ("raw", "zstd", "raw_chunk_reader")


def test_measure_reports_sizes_and_read_times_of_both_layouts(tmp_path: Path) -> None:
    row = measure(20480, 64, "float16", "relu", 2048, str(tmp_path))
    assert row["raw_mib"] > row["zstd_mib"] > 0  # half the entries are zero: zstd must shrink it
    assert row["raw_mib"] == 2.5  # raw: 10 chunks of 2048 × 64 float16, bytes as they are
    for key in ("raw_read_s", "zstd_read_s", "raw_chunk_reader_s"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert 0 < row["size_saved"] < 1
    assert list(tmp_path.iterdir()) == []  # stores removed


@pytest.mark.parametrize("n", [20480, 5000])  # whole chunks; a last chunk of 5000 - 2 × 2048 = 904 rows
def test_every_way_of_reading_reads_every_row_as_written(tmp_path: Path, n: int) -> None:
    """Each timed pass read all n rows (none fewer: a chunk the raw reader found no file for would count
    none), and the rows that the same code read, in order, are the very rows written."""
    row = measure(n, 64, "float16", "relu", 2048, str(tmp_path))
    assert row["rows_read"] == {way: n for way in WAYS}
    written = hashlib.blake2b(make_rows(n, 64, "float16", "relu").tobytes(), digest_size=16).hexdigest()
    assert row["digest_written"] == written
    assert row["digest_read"] == {way: written for way in WAYS}

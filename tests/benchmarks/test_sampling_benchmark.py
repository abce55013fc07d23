"""benchmarks/sampling.py on a small store, on real local Dask clusters (no timing is asserted)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sampling
from benchmarks._cgroup import MemoryCgroup, _own_memory_cgroup


def test_benchmark_writes_every_triplet_and_compares_the_row_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sampling.MODES, "tiny", {"n": 20_000, "p": 64, "k": 20, "n_triplets": 40_000,
                                                 "shard_size": 20_000, "chunk_rows": 1024})
    result = sampling.run("tiny", str(tmp_path), repeats=1)
    assert [r["workers"] for r in result["runs"]] == [1, 2]
    assert all(r["n_triplets_written"] == 40_000 for r in result["runs"])  # no ties in random blobs
    assert result["row_paths"]["mapped"] and result["row_paths"]["triplets"] == 20_000
    assert result["peak_pss_gib"] <= result["peak_rss_gib"]
    cgroup = result["peak_cgroup_gib"]
    assert cgroup is None or cgroup > 0
    assert list(tmp_path.iterdir()) == []  # store and shards removed
    own = _own_memory_cgroup()
    assert own is None or not (own[0] / f"alignet-bench-{os.getpid()}").exists()  # its cgroup removed


def _hold(nbytes: int) -> None:
    block = np.ones(nbytes, dtype=np.uint8)  # touched: every page charged
    assert block.sum() == nbytes


def test_memory_cgroup_charges_a_child_process_and_is_removed() -> None:
    group = MemoryCgroup.join("alignet-test")
    if group is None:
        pytest.skip("no writable memory cgroup here")
    try:
        base = group.peak_bytes()
        child = multiprocessing.get_context("spawn").Process(target=_hold, args=(256 * 2**20,))
        child.start()
        child.join()
        assert child.exitcode == 0
        assert group.peak_bytes() - base >= 256 * 2**20
        group.reset_peak()
        assert group.peak_bytes() < base + 256 * 2**20
    finally:
        group.leave()
    assert not group.path.exists()
    assert str(os.getpid()) in (group.path.parent / "cgroup.procs").read_text().split()  # back in its own group

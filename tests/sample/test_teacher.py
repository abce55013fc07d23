"""Teacher similarities from a real Zarr store and odd-one-out ordering."""

from __future__ import annotations

import gc
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from alignet_core.errors import InputError
from alignet_core.io.embedding_store import RawChunkReader, gather_rows
from alignet_core.sample.teacher import (
    _distinct_rows,
    _numpy_pair_dots,
    order_triplets,
    pair_dots,
    teacher_similarities,
)


def _direct(e: np.ndarray, t: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    a, b, c = e[t[:, 0]], e[t[:, 1]], e[t[:, 2]]
    return np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1)


def _random_triplets(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    return np.stack([rng.choice(n, 3, replace=False) for _ in range(m)])


# zstd through Zarr; raw chunks of 50 rows (not whole pages) through RawChunkReader.read; raw
# chunks of 64 rows (whole pages) memory-mapped
@pytest.mark.numerics
@pytest.mark.parametrize(("compressors", "chunk_rows"), [("auto", 50), (None, 50), (None, 64)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_similarities_match_numpy_from_zarr(tmp_path: Path, dtype: str, compressors: str | None, chunk_rows: int) -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(500, 32)).astype(dtype)
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(chunk_rows, 32), dtype=dtype, compressors=compressors)
    reader = RawChunkReader.for_array(arr)
    assert (reader is None) == (compressors == "auto")
    arr[:] = e
    assert reader is None or (reader.map_rows() is not None) == (chunk_rows == 64)
    t = _random_triplets(rng, 500, 300)
    sims = teacher_similarities(t, arr)
    assert sims.shape == (300, 3) and sims.dtype == np.float32
    np.testing.assert_allclose(sims, _direct(e, t), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(teacher_similarities(t, e), sims, rtol=1e-6, atol=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_pair_dots_across_block_boundaries(dtype: str, block: int) -> None:
    """numpy's path (no C kernel) reuses block buffers: every block, the short last one included, gives the
    float32 dot products of its own rows (a stale buffer row or an off-by-one block bound would not)."""
    rng = np.random.default_rng(4)
    e = rng.normal(size=(90, 33)).astype(dtype)
    local = rng.integers(0, 90, (50, 3))
    got = _numpy_pair_dots(e, local, block)
    assert got.shape == (50, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, _direct(e, local), rtol=1e-5, atol=1e-4)
    assert pair_dots(e, local[:0], block=block).shape == (0, 3)


@pytest.mark.parametrize("n", [40, 100_000])  # mark-and-count pass, and the sort for a sparse store
def test_distinct_rows_match_numpy_unique(n: int) -> None:
    t = np.random.default_rng(6).integers(0, n, (300, 3))
    rows, local = _distinct_rows(t, n)
    expect_rows, expect_local = np.unique(t, return_inverse=True)
    np.testing.assert_array_equal(rows, expect_rows)
    np.testing.assert_array_equal(local, expect_local.reshape(t.shape))


def test_gather_rows_in_small_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    e = rng.normal(size=(300, 5)).astype(np.float32)
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(17, 5), dtype="float32")
    arr[:] = e
    rows = np.unique(rng.integers(0, 300, 90))
    np.testing.assert_array_equal(gather_rows(arr, rows, block_rows=7), e[rows])


def _record_zarr_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(start, stop) of every Zarr array slice read from now on, in order."""
    reads: list[tuple[int, int]] = []
    original = zarr.Array.__getitem__

    def recording(self, sel):  # type: ignore[no-untyped-def]
        reads.append((sel.start, sel.stop))
        return original(self, sel)

    monkeypatch.setattr(zarr.Array, "__getitem__", recording)
    return reads


def test_gather_rows_reads_each_touched_chunk_once_aligned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk-aligned gathering: one read per chunk holding a requested row, never straddling two
    chunks, untouched chunks never read; float16 kept as float16 when asked."""
    rng = np.random.default_rng(3)
    e = rng.normal(size=(400, 6)).astype(np.float16)
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(50, 6), dtype="float16")
    arr[:] = e
    rows = np.array([0, 3, 49, 50, 51, 230, 399])  # chunks 0, 1, 4, 7
    reads = _record_zarr_reads(monkeypatch)
    out = gather_rows(arr, rows, dtype=np.float16)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, e[rows])
    assert reads == [(0, 50), (50, 100), (200, 250), (350, 400)]
    with pytest.raises(InputError):
        gather_rows(arr, np.array([5, 3]))


def test_raw_chunk_reader_reads_chunks_as_zarr_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw local store is gathered without Zarr reads and gives the same rows, the short last
    chunk included; a chunk never written (no file: Zarr's fill value) falls back to Zarr."""
    rng = np.random.default_rng(8)
    e = rng.normal(size=(230, 6)).astype(np.float16)
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(50, 6), dtype="float16",
                            compressors=None, fill_value=0)
    arr[:100] = e[:100]
    arr[150:] = e[150:]  # rows 100–149 (chunk 2) never written
    e[100:150] = 0
    reader = RawChunkReader.for_array(arr)
    assert reader is not None and reader.chunk_rows == 50
    buf = np.empty((50, 6), dtype=np.float16)
    assert reader.read(4, buf) and np.array_equal(buf[:30], e[200:230])  # last chunk: 30 rows, padded file
    assert not reader.read(2, buf)
    reads = _record_zarr_reads(monkeypatch)
    rows = np.array([0, 49, 50, 120, 149, 150, 229])
    np.testing.assert_array_equal(gather_rows(arr, rows, dtype=np.float16), e[rows])
    np.testing.assert_array_equal(gather_rows(arr, np.arange(230)), e.astype(np.float32))
    assert reads == [(100, 150), (100, 150)]  # only the missing chunk went through Zarr
    assert RawChunkReader.for_array(e) is None
    assert RawChunkReader.for_array(zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4, 6), chunks=(2, 3), dtype="float16", compressors=None)) is None


def _mapped_files(root: Path) -> set[str]:
    """Paths under `root` that this process has memory-mapped (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[-1].strip() for line in f if str(root) in line}


@pytest.mark.skipif(sys.platform != "linux", reason="memory maps of the chunk files are Linux-only")
def test_map_rows_maps_the_chunk_files_as_one_read_only_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The maps give Zarr's rows (short last chunk included), read-only, without Zarr or file
    reads; they outlive the store's deletion (an atomic republish) and go when the array goes;
    no map where a chunk has no file or chunks are not whole pages."""
    rng = np.random.default_rng(9)
    e = rng.normal(size=(300, 32)).astype(np.float16)  # 64 rows × 32 × 2 bytes = one 4 KiB page
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(64, 32), dtype="float16", compressors=None)
    arr[:] = e
    reader = RawChunkReader.for_array(arr)
    reads = _record_zarr_reads(monkeypatch)
    monkeypatch.setattr(RawChunkReader, "read", lambda *a: pytest.fail("mapped rows were read from a file"))
    t = _random_triplets(rng, 300, 200)
    np.testing.assert_allclose(teacher_similarities(t, arr), _direct(e, t), rtol=1e-5, atol=1e-4)
    assert reads == []
    m = reader.map_rows()
    assert m.shape == (300, 32) and m.dtype == np.float16 and not m.flags.writeable
    assert len(_mapped_files(tmp_path)) == 5  # ceil(300 / 64) chunk files
    shutil.rmtree(tmp_path / "e.zarr")
    np.testing.assert_array_equal(m, e)
    view = m[10:20]
    del m
    gc.collect()
    np.testing.assert_array_equal(view, e[10:20])  # a view keeps the maps
    del view
    gc.collect()
    assert _mapped_files(tmp_path) == set()

    holey = zarr.create_array(store=str(tmp_path / "h.zarr"), shape=e.shape, chunks=(64, 32), dtype="float16", compressors=None)
    holey[:64] = e[:64]
    holey[128:] = e[128:]  # chunk 1 never written
    assert RawChunkReader.for_array(holey).map_rows() is None
    monkeypatch.undo()
    expect = e.copy()
    expect[64:128] = 0
    np.testing.assert_allclose(teacher_similarities(t, holey), _direct(expect, t), rtol=1e-5, atol=1e-4)
    odd = zarr.create_array(store=str(tmp_path / "o.zarr"), shape=e.shape, chunks=(50, 32), dtype="float16", compressors=None)
    odd[:] = e
    assert RawChunkReader.for_array(odd).map_rows() is None


def _similarities_under_address_limit(url: str, triplets: np.ndarray, headroom: int) -> tuple[bool, np.ndarray]:
    """In a fresh process: cap its address space at what it uses plus `headroom`, then map and
    compute similarities."""
    import resource

    arr = zarr.open_array(url, mode="r")
    pair_dots(np.zeros((3, 4), np.float32), np.zeros((1, 3), np.int64))  # torch loaded before the cap
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.RLIM_INFINITY))
    return RawChunkReader.for_array(arr).map_rows() is None, teacher_similarities(triplets, arr)


@pytest.mark.skipif(sys.platform != "linux", reason="memory maps of the chunk files are Linux-only")
def test_a_map_the_system_refuses_falls_back_to_reading_chunks(tmp_path: Path) -> None:
    """A store larger than the address space left: no map, and the chunk reads give the same similarities."""
    rng = np.random.default_rng(10)
    e = rng.normal(size=(8192, 4096)).astype(np.float16)  # 64 MiB, chunks of 4 MiB
    arr = zarr.create_array(store=str(tmp_path / "e.zarr"), shape=e.shape, chunks=(512, 4096), dtype="float16", compressors=None)
    arr[:] = e
    assert RawChunkReader.for_array(arr).map_rows() is not None
    t = rng.integers(0, 1024, (50, 3))  # rows of two chunks: the fallback reads 8 MiB
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        unmapped, sims = pool.apply(_similarities_under_address_limit, (str(tmp_path / "e.zarr"), t, 32 * 2**20))
    assert unmapped
    np.testing.assert_allclose(sims, _direct(e, t), rtol=1e-4, atol=1e-2)


def test_order_puts_most_similar_pair_first() -> None:
    rng = np.random.default_rng(2)
    e = rng.normal(size=(200, 16)).astype(np.float32)
    t = _random_triplets(rng, 200, 500)
    sims = teacher_similarities(t, e)
    t2, s2, n_ties = order_triplets(t, sims)
    assert n_ties == 0 and len(t2) == 500
    assert ((s2[:, 0] > s2[:, 1]) & (s2[:, 0] > s2[:, 2])).all()
    # same images per row, and the stored similarities are those of the reordered images
    np.testing.assert_array_equal(np.sort(t2, axis=1), np.sort(t, axis=1))
    np.testing.assert_allclose(s2, _direct(e, t2), rtol=1e-5, atol=1e-4)
    # the odd one out (image 2) is the image outside the most similar pair of the original row
    d = _direct(e, t)
    best = np.argmax(d, axis=1)
    odd = t[np.arange(len(t)), np.array([2, 1, 0])[best]]
    np.testing.assert_array_equal(t2[:, 2], odd)


def test_tied_maximum_is_dropped_but_lower_ties_kept() -> None:
    t = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    sims = np.array(
        [
            [0.5, 0.9, 0.9],  # tied maximum → dropped
            [0.2, 0.8, 0.1],  # fine
            [0.7, 0.7, 0.7],  # all tied → dropped
            [0.9, 0.3, 0.3],  # tie below the maximum → kept
        ],
        dtype=np.float32,
    )
    t2, s2, n_ties = order_triplets(t, sims)
    assert n_ties == 2
    np.testing.assert_array_equal(t2, [[3, 5, 4], [9, 10, 11]])
    np.testing.assert_allclose(s2, [[0.8, 0.2, 0.1], [0.9, 0.3, 0.3]])


def test_ties_from_duplicate_embeddings() -> None:
    rng = np.random.default_rng(3)
    e = rng.normal(size=(10, 4)).astype(np.float32)
    e[1] = e[2]  # images 1 and 2 identical: s01 == s02 exactly in (0, 1, 2)
    e[0] = e[1] * 3  # so (0,1) and (0,2) are the tied most-similar pairs
    t = np.array([[0, 1, 2], [3, 4, 5]])
    t2, _, n_ties = order_triplets(t, teacher_similarities(t, e))
    assert n_ties == 1 and t2.shape == (1, 3)


def test_bad_inputs_raise() -> None:
    e = np.ones((5, 3), dtype=np.float32)
    with pytest.raises(InputError, match="row indices"):
        teacher_similarities(np.array([[0, 1, 5]]), e)
    with pytest.raises(InputError, match="shape"):
        teacher_similarities(np.array([0, 1, 2]), e)
    with pytest.raises(InputError, match="NaN"):
        order_triplets(np.array([[0, 1, 2]]), np.array([[np.nan, 0, 0]], dtype=np.float32))
    assert teacher_similarities(np.zeros((0, 3), np.int64), e).shape == (0, 3)

"""Content keys, manifests, atomic publish, chunk progress and embedding stores."""

import numpy as np
import pytest

from alignet_core.errors import InputError, StoreError
from alignet_core.io import embedding_store, store


def test_content_key_changes_with_config_inputs_and_code():
    base = store.content_key("s", {"k": 1}, ["a"], "c1")
    assert base == store.content_key("s", {"k": 1}, ["a"], "c1")
    assert len({base, store.content_key("s", {"k": 2}, ["a"], "c1"), store.content_key("s", {"k": 1}, ["b"], "c1"),
                store.content_key("s", {"k": 1}, ["a"], "c2"), store.content_key("t", {"k": 1}, ["a"], "c1")}) == 5


def test_manifest_marks_complete(tmp_path):
    d = str(tmp_path / "stage")
    assert not store.is_complete(d)
    with pytest.raises(StoreError, match="did not finish"):
        store.read_manifest(d)
    store.write_manifest(d, {"x": 1})
    assert store.is_complete(d) and store.read_manifest(d)["x"] == 1


def test_publish_dir_is_one_rename_and_never_overwrites(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "a.txt").write_text("x")
    store.publish_dir(str(tmp), str(tmp_path / "out" / "final"))
    assert (tmp_path / "out" / "final" / "a.txt").read_text() == "x" and not tmp.exists()
    tmp.mkdir()
    with pytest.raises(StoreError, match="already exists"):
        store.publish_dir(str(tmp), str(tmp_path / "out" / "final"))


def test_chunk_progress(tmp_path):
    p = embedding_store.ChunkProgress(str(tmp_path / "s.zarr"))
    assert p.done() == set()
    p.mark(3)
    p.mark(0)
    assert embedding_store.ChunkProgress(str(tmp_path / "s.zarr")).done() == {0, 3}


def test_embedding_store_create_reopen_and_mismatch(tmp_path):
    url = str(tmp_path / "e.zarr")
    ids = np.array(["a", "b", "c"])
    g = embedding_store.create_embedding_store(url, 3, 2, ids, "float16", 2, {"model": "m"})
    g["embeddings"][0:2] = np.ones((2, 2))
    g2 = embedding_store.create_embedding_store(url, 3, 2, ids, "float16", 2, {"model": "m"})
    assert g2["embeddings"][0].tolist() == [1, 1]  # reopened, not wiped
    r = embedding_store.open_embeddings(url)
    assert r.attrs["model"] == "m" and r["ids"][:].tolist() == ["a", "b", "c"] and not r["valid"][:].any()
    with pytest.raises(StoreError, match="another shape"):
        embedding_store.create_embedding_store(url, 3, 4, ids, "float16", 2, {})
    with pytest.raises(StoreError, match="not an embedding store"):
        embedding_store.open_embeddings(str(tmp_path / "missing.zarr"))
    assert list(embedding_store.iter_chunks(5, 2)) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]


def test_embedding_store_raw_or_compressed(tmp_path):
    """compressed=False writes each chunk's bytes as they are (no codec); both read back the same."""
    x = np.maximum(np.random.default_rng(0).standard_normal((64, 32)), 0).astype(np.float32)
    ids = np.array([str(i) for i in range(64)])
    sizes = {}
    for compressed in (True, False):
        url = str(tmp_path / f"{compressed}.zarr")
        g = embedding_store.create_embedding_store(url, 64, 32, ids, "float32", 32, {}, compressed=compressed)
        g["embeddings"][:] = x
        assert (len(g["embeddings"].compressors) > 0) == compressed
        np.testing.assert_array_equal(embedding_store.open_embeddings(url)["embeddings"][:], x)
        sizes[compressed] = sum(f.stat().st_size for f in (tmp_path / f"{compressed}.zarr" / "embeddings" / "c").rglob("*") if f.is_file())
    assert sizes[False] == x.nbytes and sizes[True] < x.nbytes  # half the entries are zero


def test_files_and_folders_reach_the_disk_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    """fsync of each file and folder of a published dataset folder happens while it is still the
    temporary, then of the parent after the rename (so a manifest cannot outlive its data after a
    power loss); the same for an atomic file write. Calls are recorded around the real `os.fsync`."""
    import os

    from alignet_core.io import store

    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def recording(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, os.path.exists(path)))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    tmp = tmp_path / "v1.tmp-0"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "manifest.json").write_text("{}")
    (tmp / "sub" / "train.npz").write_bytes(b"data")
    store.publish_dir(str(tmp), str(tmp_path / "datasets" / "v1"))
    synced = [p for p, _ in calls]
    for p in (tmp / "manifest.json", tmp / "sub" / "train.npz", tmp / "sub", tmp):
        assert str(p) in synced, (p, synced)
    assert synced[-1] == str(tmp_path / "datasets") and all(existed for _, existed in calls)
    calls.clear()
    store.write_bytes_atomic(str(tmp_path / "x.bin"), b"abc")
    assert calls[0][0].startswith(str(tmp_path / "x.bin.tmp-")) and calls[-1][0] == str(tmp_path)


def test_check_store_finite_reads_block_by_block_and_counts_every_bad_row(tmp_path, monkeypatch):
    """The whole-store finiteness check reads blocks of whole chunks, counts bad valid rows in every
    block, names the first, and ignores invalid rows (zero-filled or not)."""
    monkeypatch.setattr(embedding_store, "PASS_ROWS", 8)  # blocks of 8 rows: two chunks of 4
    n = 30
    ids = np.array([f"img{i:02d}" for i in range(n)])
    url = str(tmp_path / "e.zarr")
    g = embedding_store.create_embedding_store(url, n, 3, ids, "float16", 4, {})
    x = np.ones((n, 3), dtype=np.float16)
    x[[5, 21, 29], 1] = np.inf
    x[12, 0] = np.nan  # an invalid row: never an error
    g["embeddings"][:] = x
    valid = np.ones(n, dtype=bool)
    valid[12] = False
    g["valid"][:] = valid
    with pytest.raises(InputError, match=r"3 valid embedding row\(s\) hold NaN or inf, first row 5 \(id 'img05'\)"):
        embedding_store.check_store_finite(embedding_store.open_embeddings(url), url)
    x[[5, 21, 29], 1] = 0
    g["embeddings"][:] = x
    embedding_store.check_store_finite(embedding_store.open_embeddings(url), url)  # no error

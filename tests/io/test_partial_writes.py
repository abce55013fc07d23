"""`embedding_store.remove_partial_writes`: the temporary files a killed zarr writer leaves are removed before a
resumed embed run starts, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignet_core.io import embedding_store


def test_leftover_partial_chunk_files_are_removed_and_the_store_kept(tmp_path: Path) -> None:
    url = str(tmp_path / "emb.zarr")
    embedding_store.create_embedding_store(url, 4, 3, np.array(["a", "b", "c", "d"]), "float32", 2, {"stage": "t"})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    leftover = tmp_path / "emb.zarr" / "valid" / "c" / "1.5f2d0c.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"")
    assert embedding_store.remove_partial_writes(url) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == before
    assert embedding_store.remove_partial_writes(url) == 0
    assert embedding_store.remove_partial_writes("memory://nowhere/emb.zarr") == 0

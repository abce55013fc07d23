"""SIGKILL an import of existing embeddings (`source.kind: embeddings`) while it writes, rerun it, and get
an uninterrupted import's store, bit for bit.

The stage runs in a child process (`stage_runner`, as the pipeline runs it) on a generated float32 .npy
of 200 rows (25 chunks of 8). The import writes its rows in blocks and then marks each chunk done;
`--pace` pauses after each mark, so the kill (a seeded random delay after the first mark) lands with
some chunks marked and the rest written but unmarked. The rerun must leave the marked chunks untouched,
redo the others and end with the uninterrupted import's store: embeddings, ids, valid mask, markers
and provenance, every file byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignet_core.config import parse_config
from alignet_core.embed.stage import plan_embed
from alignet_core.io import store
from tests.reliability.stage_runner import run_until
from tests.reliability.test_embed_kill import kill_after_first_chunk
from tests.reliability.test_stage_kills import comparable_manifest, digests

N, P, CHUNK = 200, 16, 8
PACE = ("alignet_core.io.embedding_store:ChunkProgress.mark", 0.25)


def _settings(root: Path, data: Path) -> dict[str, Any]:
    return {"device": "cpu", "root": str(root), "cluster": {"k": 3}, "transform": {"enabled": False},
            "source": {"kind": "embeddings", "path": str(data / "emb.npy"), "ids": str(data / "ids.txt")},
            "embed": {"chunk_rows": CHUNK}}


def _chunk_files(store_url: str, chunks: set[int]) -> dict[str, int]:
    """mtime (ns) of the marker and embeddings chunk file of each finished chunk (`valid` is written once,
    at the end)."""
    base = Path(store_url)
    files = [base / "_progress" / f"{i:08d}.done" for i in chunks] + [base / "embeddings" / "c" / str(i) / "0" for i in chunks]
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("import")
    x = np.random.default_rng(5).normal(size=(N, P)).astype(np.float32)
    np.save(folder / "emb.npy", x)
    (folder / "ids.txt").write_text("".join(f"img{i:04d}\n" for i in range(N)))
    return folder


def test_sigkilled_import_reruns_to_the_uninterrupted_store(data: Path, tmp_path: Path) -> None:
    clean_root = tmp_path / "clean"
    clean = run_until(parse_config(_settings(clean_root, data)), "embed")
    root = tmp_path / "killed"
    cfg = parse_config(_settings(root, data))
    plan = plan_embed(cfg)
    assert plan.key == clean.key
    url = store.join(plan.dir, "embeddings.zarr")
    at_kill, where = kill_after_first_chunk(json.dumps(_settings(root, data)), url, PACE[1], seed=11, pace=PACE)
    n_chunks = -(-N // CHUNK)
    assert 1 <= len(at_kill) < n_chunks, f"{where}: the kill should land mid-run ({n_chunks} chunks)"
    assert not store.is_complete(plan.dir), where
    before = _chunk_files(url, at_kill)
    out = run_until(cfg, "embed")  # the rerun, in this process
    assert _chunk_files(url, at_kill) == before, f"{where}: chunks finished before the kill were redone"
    assert out.key == clean.key
    assert digests(Path(out.artifact)) == digests(Path(clean.artifact))  # chunks, ids, valid, markers, attributes
    got = comparable_manifest(Path(out.dir) / store.MANIFEST, root)
    assert got == comparable_manifest(Path(clean.dir) / store.MANIFEST, clean_root)
    assert got["metrics"]["imported"]["sha256"] and got["metrics"]["n_valid"] == N
    assert [str(p) for p in root.rglob("*.tmp-*")] == [], where

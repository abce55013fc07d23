"""embed.py on several devices: the devices are checked before any work, shards are whole chunks, and
several worker processes write the same store as one process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from alignet_core.config import parse_config
from alignet_core.embed.devices import _worker_env, shard_chunks
from alignet_core.embed.extract import extract_embeddings
from alignet_core.errors import ConfigError
from alignet_core.hardware import resolve_devices
from alignet_core.io.sources import ImageSource, folder_source
from tests.embed._embed import (CPU, TINY, Interrupted, _assert_same_store, _write_corrupt_files,  # noqa: F401
                               demo40, tiny)  # fixtures


def test_devices_are_checked_before_any_work(demo40: ImageSource, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"embed\.devices.*'gpu0'.*expected 'cpu', 'cuda' or 'cuda:<index>'"):
        parse_config({"embed": {"devices": ["cuda:0", "gpu0"]}})
    with pytest.raises(ConfigError, match=r"embed\.devices.*mixes cpu and cuda"):
        parse_config({"embed": {"devices": ["cpu", "cuda:0"]}})
    with pytest.raises(ConfigError, match=r"embed\.devices.*empty list"):
        parse_config({"embed": {"devices": []}})
    assert parse_config({"embed": {"devices": ["cpu", "cpu"]}}).embed.devices == ["cpu", "cpu"]
    assert resolve_devices(["cpu", "cpu"]) == [CPU, CPU]
    if not torch.cuda.is_available():
        src = ImageSource(demo40.records[:4], description="4")
        url = tmp_path / "never.zarr"
        for devices in (["cuda:0", "cuda:1"], ["cuda"]):
            with pytest.raises(ConfigError, match=r"embed\.devices.*asks for CUDA but torch sees no CUDA GPU"):
                extract_embeddings(src, TINY.model_copy(update={"devices": devices}), str(url), CPU)
        assert not url.exists()  # nothing was written
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=rf"embed\.devices.*'cuda:{n}'.*torch sees {n} CUDA GPU"):
            resolve_devices([f"cuda:{n}"])


def test_shards_are_contiguous_disjoint_runs_of_whole_chunks() -> None:
    assert shard_chunks(list(range(5)), 2) == [[0, 1], [2, 3, 4]]
    assert shard_chunks([1, 2, 7, 8, 9], 2) == [[1, 2], [7, 8, 9]]  # resumed: only the chunks left, balanced
    assert shard_chunks([3], 4) == [[3]]  # never an empty shard (no idle worker is started)
    for n, k in ((17, 3), (4, 4), (100, 7)):
        shards = shard_chunks(list(range(n)), k)
        assert [c for s in shards for c in s] == list(range(n)) and max(map(len, shards)) - min(map(len, shards)) <= 1
    # each worker sees only its own GPU, as cuda:0; CPU workers see none
    assert _worker_env(torch.device("cuda:3")) == ({"CUDA_VISIBLE_DEVICES": "3"}, "cuda:0")
    assert _worker_env(CPU) == ({"CUDA_VISIBLE_DEVICES": ""}, "cpu")


@pytest.mark.slow  # two worker processes start and import torch: ~25 s on 2 cores
def test_two_cpu_workers_finish_a_partial_store_into_the_single_process_store(
    demo40: ImageSource, tiny, tmp_path: Path, one_torch_thread: None
) -> None:
    """Two Dask worker processes (devices ['cpu', 'cpu']) resume a run stopped after one chunk; the store
    is byte-identical to one process's uninterrupted run: ids in order, embeddings, valid, skipped, attrs."""
    root = tmp_path / "images"
    for rec in demo40.records[:21]:
        (root / "emoji").mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, root / "emoji" / Path(rec.path).name)
    (root / "bad").mkdir()
    broken = _write_corrupt_files(root / "bad")
    src = folder_source(str(root))
    cfg = TINY.model_copy(update={"chunk_rows": 4, "batch_size": 3, "num_workers": 1})
    single = str(tmp_path / "single.zarr")
    extract_embeddings(src, cfg, single, CPU)

    url = str(tmp_path / "two.zarr")

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise Interrupted(f"stopped at {done}/{total}")

    with pytest.raises(Interrupted):
        extract_embeddings(src, cfg, url, CPU, progress=stop_after_first_chunk)
    calls: list[tuple[int, int]] = []
    result = extract_embeddings(src, cfg.model_copy(update={"devices": ["cpu", "cpu"]}), url, CPU,
                                progress=lambda d, t: calls.append((d, t)))
    assert result["n"] == 24 and result["n_valid"] == 21 and {s["id"] for s in result["skipped"]} == set(broken)
    assert calls[-1] == (24, 24)
    _assert_same_store(url, single)
    for name in ("_skipped", "_progress"):
        assert sorted(p.name for p in (Path(url) / name).iterdir()) == sorted(p.name for p in (Path(single) / name).iterdir())
    for p in (Path(single) / "_skipped").iterdir():
        assert (Path(url) / "_skipped" / p.name).read_bytes() == p.read_bytes()

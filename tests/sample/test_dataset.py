"""Shards, resume and publication of the official-format dataset, end to end on real stores."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import embedding_store, store
from alignet_core.io.formats import read_alignet_npz
from alignet_core.sample.distinct import MAX_TOP_UPS
from alignet_core.sample.distinct import first_occurrences as _first_occurrences
from alignet_core.sample.distinct import triplet_keys as _triplet_keys
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import ShardSpec, plan_shards, run_shard, shard_path

CHECKER = "/work/shared/tools/check_alignet_npz.py"
NAMES = {"cluster_border": "cluster_border_4", "between_class": "between_class", "within_class": "within_class"}


def _write_npy(path: Path, arr: np.ndarray) -> str:
    np.save(path, arr)
    return str(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real store of 300 images (some undecodable), class labels and cluster ids."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    n, p = 300, 8
    x = rng.normal(size=(n, p)).astype(np.float32)
    valid = rng.random(n) > 0.1
    url = str(root / "emb.zarr")
    g = embedding_store.create_embedding_store(url, n, p, np.array([f"img/{i:04d}.jpg" for i in range(n)]), "float16", 64, {})
    g["embeddings"][:] = np.where(valid[:, None], x, 0).astype(np.float16)
    g["valid"][:] = valid
    classes = rng.integers(0, 10, n)  # the groups file does not know about undecodable images
    clusters = rng.integers(0, 4, n)
    return {
        "store": url,
        "valid": valid,
        "filenames": np.array([f"img/{i:04d}.jpg" for i in range(n)]),
        "groups": {
            "between_class": _write_npy(root / "classes.npy", classes),
            "within_class": str(root / "classes.npy"),
            "cluster_border": _write_npy(root / "clusters.npy", clusters),
        },
    }


def _run_all(specs: list[ShardSpec], pool: dict, out_dir: str, order: list[int], workers: int = 1) -> None:
    jobs = [specs[i] for i in order]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        list(ex.map(lambda s: run_shard(s, pool["groups"][s.strategy], pool["store"], out_dir), jobs))


def _check(path: str) -> None:
    res = subprocess.run([sys.executable, CHECKER, path], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_plan_shards() -> None:
    specs = plan_shards(["cluster_border", "between_class"], n_train=2500, n_valid=300, shard_size=1000, seed=3)
    by = {(s.strategy, s.split): [x for x in specs if (x.strategy, x.split) == (s.strategy, s.split)] for s in specs}
    assert [s.n for s in by["cluster_border", "train"]] == [1000, 1000, 500]
    assert [s.n for s in by["between_class", "valid"]] == [300]
    assert [s.index for s in by["cluster_border", "train"]] == [0, 1, 2]
    assert by["cluster_border", "train"][0].seed != by["cluster_border", "valid"][0].seed
    assert specs[0].name == "cluster_border-train-00000"
    assert plan_shards(["cluster_border"], 10, 5, 4, 3) == plan_shards(["cluster_border"], 10, 5, 4, 3)
    assert len({s.name for s in specs}) == len(specs)
    for bad in (dict(strategies=["random"]), dict(n_train=0), dict(shard_size=0), dict(strategies=["cluster", "cluster"])):
        kw = dict(strategies=["cluster"], n_train=10, n_valid=5, shard_size=4, seed=0) | bad
        with pytest.raises(ConfigError, match="sample"):
            plan_shards(**kw)


def test_shard_content_and_resume(pool: dict, tmp_path: Path) -> None:
    spec = ShardSpec("cluster_border", "train", 0, 2000, 11)
    path = run_shard(spec, pool["groups"]["cluster_border"], pool["store"], str(tmp_path))
    assert path == shard_path(str(tmp_path), spec) and Path(path).is_file()
    z = np.load(path)
    idx, sims = z["indices"], z["similarities"]
    assert len(idx) + int(z["n_ties"]) == 2000
    assert ((sims[:, 0] > sims[:, 1]) & (sims[:, 0] > sims[:, 2])).all()
    assert pool["valid"][idx].all(), "an undecodable image was sampled"
    clusters = np.load(pool["groups"]["cluster_border"])
    g3 = np.sort(clusters[idx], axis=1)
    assert ((g3[:, 0] == g3[:, 1]) != (g3[:, 1] == g3[:, 2])).all()  # exactly two share a cluster
    before = Path(path).stat().st_mtime_ns, Path(path).read_bytes()
    assert run_shard(spec, pool["groups"]["cluster_border"], pool["store"], str(tmp_path)) == path
    assert (Path(path).stat().st_mtime_ns, Path(path).read_bytes()) == before
    assert not list((tmp_path / "shards").glob("*.tmp-*"))


@pytest.fixture(scope="module")
def published(pool: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pub")
    specs = plan_shards(["cluster_border", "between_class", "within_class"], 3000, 400, 700, seed=1)
    _run_all(specs, pool, str(root / "work"), list(range(len(specs))))
    url = str(root / "datasets" / "demo")
    manifest = assemble_dataset(str(root / "work"), specs, pool["filenames"], url, NAMES)
    return {"root": root, "specs": specs, "url": url, "manifest": manifest}


def test_published_files_pass_the_official_checker(published: dict, pool: dict) -> None:
    url, manifest = published["url"], published["manifest"]
    files = sorted(p.name for p in Path(url).iterdir())
    expected = sorted([f"{s}_{n}.npz" for n in NAMES.values() for s in ("train", "valid")]
                      + ["manifest.json", "dataset.zarr"])
    assert files == expected
    for fname, info in manifest["files"].items():
        path = f"{url}/{fname}"
        _check(path)
        data = read_alignet_npz(path, n_images=len(pool["filenames"]))
        assert data.n_reordered == 0 and len(data) == info["n_triplets"] > 0
        assert info["sha256"] == store.file_sha256(path)
        np.testing.assert_array_equal(data.filenames, pool["filenames"][data.indices])
        assert pool["valid"][data.indices].all()
    assert not [p for p in Path(url).parent.iterdir() if ".tmp-" in p.name]


def test_no_duplicates_and_no_leakage(published: dict) -> None:
    url, manifest = published["url"], published["manifest"]
    for strategy, st in manifest["strategies"].items():
        train = read_alignet_npz(f"{url}/train_{st['name']}.npz").indices
        valid = read_alignet_npz(f"{url}/valid_{st['name']}.npz").indices
        tk, vk = _triplet_keys(train, 300), _triplet_keys(valid, 300)
        assert len(np.unique(tk)) == len(tk) and len(np.unique(vk)) == len(vk)
        assert not np.isin(vk, tk).any()
        for split in ("train", "valid"):
            s = st[split]
            lost = s["ties_dropped"] + s["duplicates_removed"] + s["in_train_removed"] + s["surplus_dropped"]
            assert s["drawn"] - lost == s["n_triplets"]
            assert s["drawn"] == s["requested"] and s["top_up_shards"] == 0  # no top-up asked for here
    # a 300-image pool with 4 clusters: duplicates and leakage do occur and were removed
    cb = manifest["strategies"]["cluster_border"]
    assert cb["train"]["duplicates_removed"] > 0 or cb["valid"]["in_train_removed"] > 0


def test_second_assemble_returns_manifest_without_rewriting(published: dict, pool: dict) -> None:
    url = published["url"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(url).iterdir()}
    again = assemble_dataset(str(published["root"] / "work"), published["specs"], pool["filenames"], url, NAMES)
    assert again == published["manifest"]
    assert {p.name: p.stat().st_mtime_ns for p in Path(url).iterdir()} == mtimes


def test_manifest_names_the_machine_and_libraries_that_made_it(published: dict) -> None:
    """Same bytes are promised for the same machine, kernels and threads only: the manifest says which."""
    import torch

    made = store.read_manifest(published["url"])["made_on"]
    assert made["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert made["torch_threads"] == torch.get_num_threads() and made["cores"] >= 1 and made["cpu_model"]
    assert torch.__version__.startswith(made["libraries"]["torch"]) and made["libraries"]["numpy"] == np.__version__
    assert made["libraries"]["faiss-cpu"] and made["libraries"]["zarr"]


def test_identical_output_whatever_the_shard_order(published: dict, pool: dict, tmp_path: Path) -> None:
    """Shards made in another order and published by three threads (one per strategy): the same files,
    byte for byte, and the same manifest."""
    specs = published["specs"]
    order = list(np.random.default_rng(5).permutation(len(specs)))
    _run_all(specs, pool, str(tmp_path / "work"), order, workers=3)
    url = str(tmp_path / "demo")
    manifest = assemble_dataset(str(tmp_path / "work"), list(reversed(specs)), pool["filenames"], url, NAMES,
                                workers=3)
    assert manifest == published["manifest"]
    for path in sorted(Path(published["url"]).rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            assert (Path(url) / path.relative_to(published["url"])).read_bytes() == path.read_bytes(), path


def test_missing_shard_and_missing_name_raise(pool: dict, tmp_path: Path) -> None:
    specs = plan_shards(["cluster_border"], 100, 10, 50, seed=0)
    _run_all(specs[:1], pool, str(tmp_path / "work"), [0])
    with pytest.raises(StoreError, match="missing"):
        assemble_dataset(str(tmp_path / "work"), specs, pool["filenames"], str(tmp_path / "d"), NAMES)
    with pytest.raises(ConfigError, match="sampling_names"):
        assemble_dataset(str(tmp_path / "work"), specs, pool["filenames"], str(tmp_path / "d"), {})
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob("d.tmp-*"))


def test_triplet_keys_wide_pool_matches_packed() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 50, size=(2000, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2])]
    perm = np.take_along_axis(t, rng.permuted(np.tile([0, 1, 2], (len(t), 1)), axis=1), axis=1)
    both = np.concatenate([t, perm])
    packed, wide = _triplet_keys(both, 100), _triplet_keys(both, 1 << 30)
    assert wide.dtype.names is not None  # the structured path for pools beyond 2**21 images
    np.testing.assert_array_equal(_first_occurrences(packed), _first_occurrences(wide))
    assert (_first_occurrences(packed) < len(t)).all()  # every permuted copy is a duplicate
    np.testing.assert_array_equal(np.isin(packed[len(t):], packed[: len(t)]), np.isin(wide[len(t):], wide[: len(t)]))


def test_zarr_copy_matches_the_npz_files(published: dict, pool: dict) -> None:
    import zarr

    from alignet_core.sample.publish import read_zarr_split

    root, manifest = Path(published["url"]), published["manifest"]
    z = zarr.open_group(str(root / manifest["zarr"]["path"]), mode="r")
    assert sorted(manifest["zarr"]["groups"]) == sorted(f[:-4] for f in manifest["files"])
    assert np.asarray(z[manifest["zarr"]["filenames"]][:]).tolist() == np.asarray(pool["filenames"]).tolist()
    for fname in manifest["files"]:
        split = read_alignet_npz(str(root / fname))
        g = z[fname[:-4]]
        assert sorted(g.array_keys()) == ["indices", "similarities"]  # names once, not per triplet
        np.testing.assert_array_equal(g["indices"][:], split.indices)
        np.testing.assert_array_equal(g["similarities"][:], split.similarities)
        copy = read_zarr_split(str(root), fname[:-4])
        for key in ("indices", "filenames", "similarities"):
            np.testing.assert_array_equal(getattr(copy, key), getattr(split, key))
    with pytest.raises(InputError, match=r"the Zarr copy has no split 'train_nope'; it has \['train_"):
        read_zarr_split(str(root), "train_nope")


def test_a_zarr_copy_of_the_earlier_layout_reads_the_same(published: dict, tmp_path: Path) -> None:
    """Versions published before the names were stored once carry them per triplet in each split's group."""
    import zarr

    from alignet_core.sample.publish import read_zarr_split

    manifest = published["manifest"]
    fname = sorted(manifest["files"])[0]
    split = read_alignet_npz(str(Path(published["url"]) / fname))
    old = zarr.open_group(str(tmp_path / "old" / "dataset.zarr"), mode="w").create_group(fname[:-4])
    for key in ("indices", "similarities", "filenames"):
        arr = np.asarray(getattr(split, key))
        old.create_array(key, shape=arr.shape, dtype=str if key == "filenames" else arr.dtype)[:] = arr
    info = {"zarr": {"path": "dataset.zarr", "groups": [fname[:-4]], "arrays": ["indices", "similarities", "filenames"]}}
    copy = read_zarr_split(str(tmp_path / "old"), fname[:-4], info)
    for key in ("indices", "filenames", "similarities"):
        np.testing.assert_array_equal(getattr(copy, key), getattr(split, key))


def test_zarr_copy_written_chunk_by_chunk_equals_a_whole_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits and the pool's names, several Zarr chunks each (and a partial last one), are written a chunk at a
    time; their files are byte for byte those of one whole-array write, for numpy str and StringDType names alike."""
    import hashlib

    import zarr

    from alignet_core.sample import publish

    monkeypatch.setattr(publish, "ZARR_CHUNK_TRIPLETS", 40)
    rng = np.random.default_rng(3)
    ids = np.array([f"img_{i:04d}" for i in range(300)])
    idx = rng.integers(0, 300, (100, 3))
    sims = rng.random((100, 3)).astype(np.float32)

    def files(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    whole = zarr.open_group(str(tmp_path / "whole.zarr"), mode="w")
    for key, arr in (("indices", idx.astype(np.int64)), ("similarities", sims)):
        whole.require_group("s").create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=(40, 3))[:] = arr
    whole.require_group("images").create_array("filenames", shape=ids.shape, dtype=str, chunks=(40,))[:] = ids
    for out, names in (("chunked.zarr", ids), ("strings.zarr", np.asarray(ids, dtype=np.dtypes.StringDType()))):
        publish._write_zarr_split(str(tmp_path / out), "s", idx, sims)
        publish._write_zarr_images(str(tmp_path / out), names)
    expected = files(tmp_path / "whole.zarr")
    assert len([f for f in expected if "/c/" in f]) == 3 + 3 + 8  # 100 triplets and 300 names in chunks of 40
    assert files(tmp_path / "chunked.zarr") == expected == files(tmp_path / "strings.zarr")


# ----------------------------------------------------------------------------- exact counts
@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """12 images in 3 clusters of 4: exactly 3 · C(4,2) · 8 = 144 distinct cluster-border triplets."""
    root = tmp_path_factory.mktemp("tiny")
    n = 12
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    url = str(root / "emb.zarr")
    g = embedding_store.create_embedding_store(url, n, 8, np.array([f"t/{i:02d}.jpg" for i in range(n)]), "float32", 64, {})
    g["embeddings"][:] = x
    g["valid"][:] = True
    return {"store": url, "filenames": np.array([f"t/{i:02d}.jpg" for i in range(n)]),
            "groups": _write_npy(root / "clusters.npy", np.arange(n) % 3)}


def _publish_exact(pool: dict, work: Path, url: str, n_train: int, n_valid: int) -> dict:
    specs = plan_shards(["cluster_border"], n_train, n_valid, 40, seed=2)
    run = lambda s: run_shard(s, pool["groups"], pool["store"], str(work))  # noqa: E731
    for s in specs:
        run(s)
    return assemble_dataset(str(work), specs, pool["filenames"], url, NAMES, top_up=run)


def test_each_split_holds_exactly_the_distinct_triplets_asked(tiny_pool: dict, tmp_path: Path) -> None:
    """100 train + 30 valid of the 144 possible: the planned draws repeat themselves heavily."""
    m = _publish_exact(tiny_pool, tmp_path / "w1", str(tmp_path / "d1"), 100, 30)
    st = m["strategies"]["cluster_border"]
    train = read_alignet_npz(str(tmp_path / "d1" / "train_cluster_border_4.npz")).indices
    valid = read_alignet_npz(str(tmp_path / "d1" / "valid_cluster_border_4.npz")).indices
    assert len(train) == 100 and len(valid) == 30
    tk, vk = _triplet_keys(train, 12), _triplet_keys(valid, 12)
    assert len(np.unique(tk)) == 100 and len(np.unique(vk)) == 30 and not np.isin(vk, tk).any()
    for split in ("train", "valid"):
        s = st[split]
        assert s["n_triplets"] == s["requested"] and s["top_up_shards"] >= 1 and s["duplicates_removed"] > 0
        lost = s["ties_dropped"] + s["duplicates_removed"] + s["in_train_removed"] + s["surplus_dropped"]
        assert s["drawn"] - lost == s["n_triplets"]
        f = m["files"][f"{split}_cluster_border_4.npz"]
        assert f["duplicates_drawn"] == s["duplicates_removed"] and f["top_up_shards"] == s["top_up_shards"]
    # deterministic: a rerun from scratch publishes byte-identical files
    again = _publish_exact(tiny_pool, tmp_path / "w2", str(tmp_path / "d2"), 100, 30)
    for fname, info in m["files"].items():
        assert again["files"][fname]["sha256"] == info["sha256"]
        assert (tmp_path / "d1" / fname).read_bytes() == (tmp_path / "d2" / fname).read_bytes()


def test_a_count_the_pool_cannot_supply_is_a_clear_error(tiny_pool: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"sample.n_train: cluster_border can supply only 144 distinct train "
                                         rf"triplets of the 150 asked, after \d+ draws \({MAX_TOP_UPS} top-up shards\)"):
        _publish_exact(tiny_pool, tmp_path / "w", str(tmp_path / "d"), 150, 10)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob("d.tmp-*"))
    with pytest.raises(InputError, match=r"sample.n_valid: .* distinct valid triplets not in train of the 10 asked"):
        _publish_exact(tiny_pool, tmp_path / "w3", str(tmp_path / "d3"), 140, 10)

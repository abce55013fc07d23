"""Shards of triplets and the publication of the official-format AligNet dataset (stage 3).

The dataset is made in shards, the unit of parallelism and of resume:

1. `plan_shards` splits each strategy's train and valid counts into `ShardSpec`s. Train and
   valid draw from different seed streams, and each shard's generator depends only on
   (strategy, split seed, shard index), so the result never depends on the number of workers.
2. `run_shard` samples one shard (`sampling.sample_shard`), computes the teacher's similarities
   from the transformed store (`teacher.teacher_similarities`, reading only the needed rows),
   orders each triplet so image 2 is the odd one out, drops rows with a tied maximum, and writes
   `<out_dir>/shards/<name>.npz` atomically. An existing shard file is a finished shard: the
   call returns at once, so a killed run resumes without redoing or duplicating work.
3. `assemble_dataset` concatenates each strategy's shards in index order, removes duplicate
   triplets (as unordered image sets) inside train and inside valid, removes from valid every
   triplet that also occurs in train (no leakage, always), writes `train_<name>.npz` and
   `valid_<name>.npz` with `formats.write_alignet_npz`, the same arrays as a Zarr copy
   (`dataset.zarr`, one group per file) and `manifest.json` into a temporary
   directory, and publishes it with one atomic rename: readers see the whole dataset or nothing.

Because shards are concatenated in index order and de-duplication keeps first occurrences, the
published arrays are identical whatever order the shards were produced in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np

from alignet_core.io import embedding_store, store
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io.formats import savez_reproducible, write_alignet_npz
from alignet_core.sample.strategies import STRATEGIES, sample_shard
from alignet_core.sample.teacher import order_triplets, teacher_similarities

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardSpec:
    """One shard: `n` triplets of `strategy` for `split`, shard number `index`, split seed `seed`."""

    strategy: str
    split: str  # 'train' | 'valid'
    index: int
    n: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.split}-{self.index:05d}"


def split_seed(seed: int, split: str) -> int:
    """The seed stream of a split, derived from the pipeline seed (train and valid differ)."""
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    return int(np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(1)[0])


def plan_shards(strategies: list[str], n_train: int, n_valid: int, shard_size: int, seed: int) -> list[ShardSpec]:
    """Split every strategy's train and valid counts into shards of at most `shard_size` triplets.

    Returns the specs in a fixed order (strategy, split, index). Raises `ConfigError` naming the
    `sample.*` field for an unknown or repeated strategy or a bad count.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"sample.strategies: unknown {unknown}; expected some of {list(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"sample.strategies: each strategy may appear once, got {list(strategies)}")
    if not strategies:
        raise ConfigError("sample.strategies: at least one strategy is needed")
    if n_train <= 0:
        raise ConfigError(f"sample.n_train: expected a positive count, got {n_train}")
    if n_valid < 0:
        raise ConfigError(f"sample.n_valid: expected a non-negative count, got {n_valid}")
    if shard_size <= 0:
        raise ConfigError(f"sample.shard_size: expected a positive count, got {shard_size}")
    if seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed}")
    specs = []
    for strategy in strategies:
        for split, total in (("train", n_train), ("valid", n_valid)):
            s = split_seed(seed, split)
            for index, start in enumerate(range(0, total, shard_size)):
                specs.append(ShardSpec(strategy, split, index, min(shard_size, total - start), s))
    return specs


def shard_path(out_dir: str, spec: ShardSpec) -> str:
    return store.join(out_dir, SHARDS_DIR, f"{spec.name}.npz")


def _load_groups(groups_url: str) -> np.ndarray:
    groups = store.read_npy(groups_url, "groups")
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
        raise InputError(f"{groups_url!r}: expected (n,) integer group ids, got {groups.shape} {groups.dtype}")
    return groups.astype(np.int64)


def _write_npz_atomic(url: str, **arrays: np.ndarray) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        savez_reproducible(f, arrays)
    fs.mv(tmp, path)


def run_shard(spec: ShardSpec, groups_url: str, store_url: str, out_dir: str) -> str:
    """Make one shard: sample, teacher similarities, odd-one-out order; write it atomically.

    groups_url: .npy (n,) int group ids (class labels or cluster assignments, -1 = ineligible);
    store_url: the (transformed) embedding store, (n, p). Rows the store marks invalid are made
    ineligible here too, whatever the groups file says. Writes `<out_dir>/shards/<name>.npz`
    with `indices` (m, 3) int64, `similarities` (m, 3) float32 (s01 strictly largest),
    `n_requested` and `n_ties` (rows dropped for a tied maximum). Returns the shard path; if
    the file already exists, returns it without doing anything (resume).
    """
    path = shard_path(out_dir, spec)
    if store.exists(path):
        log.debug("shard %s exists, skipped", spec.name)
        return path
    groups = _load_groups(groups_url)
    g = embedding_store.open_embeddings(store_url)
    emb = g["embeddings"]
    if len(groups) != emb.shape[0]:
        raise InputError(f"{groups_url!r} has {len(groups)} group ids but {store_url!r} has {emb.shape[0]} rows")
    groups[~np.asarray(g["valid"][:], dtype=bool)] = -1
    triplets = sample_shard(spec.strategy, groups, spec.n, spec.seed, spec.index)
    sims = teacher_similarities(triplets, emb)
    triplets, sims, n_ties = order_triplets(triplets, sims)
    _write_npz_atomic(
        path,
        indices=triplets,
        similarities=sims,
        n_requested=np.int64(spec.n),
        n_ties=np.int64(n_ties),
    )
    log.info("shard %s: %d triplets (%d tied dropped)", spec.name, len(triplets), n_ties)
    return path


def _read_shard(url: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    try:
        with fsspec.open(url, "rb") as f:
            z = np.load(f, allow_pickle=False)
            return z["indices"], z["similarities"], int(z["n_requested"]), int(z["n_ties"])
    except FileNotFoundError:
        raise StoreError(f"shard {url!r} is missing: run its shard before assembling") from None
    except (KeyError, ValueError, OSError) as err:
        raise StoreError(f"shard {url!r} is unreadable ({err}); delete it and run the shard again") from None


def _triplet_keys(indices: np.ndarray, n_images: int) -> np.ndarray:
    """One comparable key per triplet, equal for the same unordered set of images.

    indices: (m, 3) int in [0, n_images). Returns (m,) int64 (three 21-bit fields) when
    n_images ≤ 2**21, else a structured array of three sorted int64 fields; the key type
    depends only on n_images, so keys of two splits of one pool are always comparable.
    """
    s = np.sort(np.asarray(indices, dtype=np.int64), axis=1)
    if n_images <= (1 << 21):
        return (s[:, 0] << 42) | (s[:, 1] << 21) | s[:, 2]
    keys = np.empty(len(s), dtype=[("a", np.int64), ("b", np.int64), ("c", np.int64)])
    keys["a"], keys["b"], keys["c"] = s[:, 0], s[:, 1], s[:, 2]
    return keys


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Sorted row numbers of the first occurrence of each distinct key. keys: (m,)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _arrays_sha256(indices: np.ndarray, similarities: np.ndarray) -> str:
    """Hash of the published arrays' contents (stable across runs, unlike zip timestamps)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(similarities, dtype=np.float32)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _concat_split(out_dir: str, specs: list[ShardSpec]) -> tuple[np.ndarray, np.ndarray, int, int]:
    indices = sorted(s.index for s in specs)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"shard specs repeat an index for {specs[0].strategy}/{specs[0].split}: {indices}")
    parts = [_read_shard(shard_path(out_dir, s)) for s in sorted(specs, key=lambda s: s.index)]
    if not parts:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32), 0, 0
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64)
    sims = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return idx, sims, sum(p[2] for p in parts), sum(p[3] for p in parts)


#: the Zarr copy of the published splits, inside the published folder
ZARR_COPY = "dataset.zarr"
#: triplets per Zarr chunk of the published copy (24 MB of int64 indices)
ZARR_CHUNK_TRIPLETS = 1 << 20


def _write_zarr_split(group_url: str, name: str, indices: np.ndarray, filenames: np.ndarray, similarities: np.ndarray) -> None:
    """Write one published split into the Zarr copy as group `<name>` with arrays
    `indices` (m, 3) int64, `similarities` (m, 3) float32 and `filenames` (m, 3) str."""
    import zarr

    root = zarr.open_group(group_url, mode="a")
    g = root.create_group(name, overwrite=True)
    rows = max(1, min(len(indices), ZARR_CHUNK_TRIPLETS))
    for key, arr in (("indices", np.asarray(indices, dtype=np.int64)),
                     ("similarities", np.asarray(similarities, dtype=np.float32)),
                     ("filenames", np.asarray(np.asarray(filenames).tolist(), dtype=str).reshape(-1, 3))):
        z = g.create_array(key, shape=arr.shape, dtype=arr.dtype if key != "filenames" else str, chunks=(rows, 3))
        if len(arr):
            z[:] = arr


def assemble_dataset(
    out_dir: str,
    specs: list[ShardSpec],
    filenames: np.ndarray,
    publish_url: str,
    sampling_names: dict[str, str],
    dedupe: bool = True,
    subfolder: str = "",
    extra: dict | None = None,
) -> dict:
    """Publish the shards as official AligNet files: `train_<name>.npz`, `valid_<name>.npz`.

    filenames: (n,) str, the image pool's file names (row i ↔ index i). sampling_names maps a
    strategy to its official name, e.g. {'cluster_border': 'cluster_border_500'}. With
    `dedupe`, duplicate triplets (same three images in any order) are removed inside each split
    (first occurrence kept); valid triplets that also occur in train are always removed.
    The same arrays are also written as a Zarr copy, `dataset.zarr/<split>_<name>/{indices,
    similarities,filenames}` (listed under the manifest's `zarr` key), for chunked readers.
    The files go into `publish_url/<subfolder>/` (e.g. `uncertainty_distillation`, the official
    layout); `manifest.json` sits at `publish_url` and lists each file's path relative to it.
    Everything is written into a temporary directory next to `publish_url`, with the manifest
    (counts, ties dropped, duplicates removed, sha256 per file, plus `extra`, e.g. the config and
    input keys of a dataset version), then moved into place by one rename. If `publish_url` is
    already complete its manifest is returned as is.
    Returns the manifest dict.
    """
    if store.exists(publish_url):
        if store.is_complete(publish_url):
            log.info("dataset %s already published", publish_url)
            return store.read_manifest(publish_url)
        raise StoreError(f"{publish_url!r} exists but has no manifest; it was not written by assemble_dataset")
    filenames = np.asarray(filenames, dtype=str)
    if filenames.ndim != 1:
        raise InputError(f"filenames: expected shape (n,), got {filenames.shape}")
    strategies = list(dict.fromkeys(s.strategy for s in specs))
    if not strategies:
        raise ConfigError("assemble_dataset: no shard specs given")
    missing = [s for s in strategies if s not in sampling_names]
    if missing:
        raise ConfigError(f"sampling_names: no official name for strategies {missing}")
    names = [sampling_names[s] for s in strategies]
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"sampling_names: names must be distinct plain file names, got {names}")

    tmp = f"{publish_url.rstrip('/')}.tmp-{uuid.uuid4().hex}"
    manifest: dict = {
        "format": "alignet-npz",
        "odd_one_out": "image 2; similarities [s01, s02, s12] with s01 strictly largest",
        "n_images": int(len(filenames)),
        "dedupe": bool(dedupe),
        "files": {},
        "strategies": {},
        **(extra or {}),
    }
    files_dir = store.join(tmp, subfolder) if subfolder else tmp
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        for strategy, name in zip(strategies, names):
            stats: dict = {"name": name}
            split_data = {}
            for split in SPLITS:
                idx, sims, requested, ties = _concat_split(out_dir, [s for s in specs if s.strategy == strategy and s.split == split])
                if len(idx) and idx.max() >= len(filenames):
                    raise InputError(f"{strategy}/{split}: index {int(idx.max())} but only {len(filenames)} filenames")
                keys = _triplet_keys(idx, len(filenames))
                n_before = len(idx)
                if dedupe:
                    keep = _first_occurrences(keys)
                    idx, sims, keys = idx[keep], sims[keep], keys[keep]
                st = {"requested": requested, "ties_dropped": ties, "duplicates_removed": n_before - len(idx)}
                if split == "valid":
                    leak = np.isin(keys, split_data["train"][2]) if len(keys) else np.zeros(0, bool)
                    idx, sims = idx[~leak], sims[~leak]
                    st["in_train_removed"] = int(leak.sum())
                split_data[split] = (idx, sims, keys)
                fname = f"{split}_{name}.npz"
                url = store.join(files_dir, fname)
                write_alignet_npz(url, idx, filenames[idx], sims)
                _write_zarr_split(store.join(files_dir, ZARR_COPY), f"{split}_{name}", idx, filenames[idx], sims)
                st["n_triplets"] = int(len(idx))
                st["file"] = fname
                stats[split] = st
                manifest["files"][fname] = {
                    "strategy": strategy,
                    "split": split,
                    "path": prefix + fname,
                    "n_triplets": int(len(idx)),
                    "sha256": store.file_sha256(url),
                    "arrays_sha256": _arrays_sha256(idx, sims),
                }
            manifest["strategies"][strategy] = stats
        manifest["zarr"] = {
            "path": prefix + ZARR_COPY,
            "groups": sorted(f[: -len(".npz")] for f in manifest["files"]),
            "arrays": ["indices", "similarities", "filenames"],
            "note": "the same arrays as the .npz files, one Zarr group per file (chunked; for Dask/xarray readers)",
        }
        store.write_manifest(tmp, manifest)
        try:
            store.publish_dir(tmp, publish_url)
        except StoreError:
            if store.is_complete(publish_url):  # another worker published first: keep theirs
                log.info("dataset %s was published concurrently; keeping that copy", publish_url)
                return store.read_manifest(publish_url)
            raise
    finally:
        store.remove(tmp)
    log.info("published %s: %s", publish_url, {f: v["n_triplets"] for f, v in manifest["files"].items()})
    return store.read_manifest(publish_url)

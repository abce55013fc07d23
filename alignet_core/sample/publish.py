"""Publication of the official-format AligNet dataset from finished shards (stage 3).

`assemble_dataset` concatenates each strategy's shards in index order, removes duplicate
triplets (as unordered image sets) inside train and inside valid, removes from valid every
triplet that also occurs in train (no leakage, always), writes `train_<name>.npz` and
`valid_<name>.npz` with `formats.write_alignet_npz`, the same arrays as a Zarr copy
(`dataset.zarr`, one group per file) and `manifest.json` into a temporary directory, and
publishes it with one atomic rename: readers see the whole dataset or nothing.

Because shards are concatenated in index order and de-duplication keeps first occurrences, the
published arrays are identical whatever order the shards were produced in.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

import numpy as np

from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import store
from alignet_core.io.formats import write_alignet_npz
from alignet_core.sample.shards import SPLITS, ShardSpec, read_shard, shard_path

log = logging.getLogger(__name__)


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
    parts = [read_shard(shard_path(out_dir, s)) for s in sorted(specs, key=lambda s: s.index)]
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

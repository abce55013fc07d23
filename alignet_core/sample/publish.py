"""Publication of the official-format AligNet dataset from finished shards (stage 3).

`assemble_dataset` concatenates each strategy's shards in index order, removes duplicate
triplets (as unordered image sets) inside train and inside valid, removes from valid every
triplet that also occurs in train (no leakage, always), tops each split up to the count asked
(`distinct.py`), writes `train_<name>.npz` and
`valid_<name>.npz` with `formats.write_alignet_npz`, the same arrays as a Zarr copy
(`dataset.zarr`, one group per file, the pool's file names once) and `manifest.json` into a temporary directory, and
publishes it with one atomic rename: readers see the whole dataset or nothing.

Because shards are concatenated in index order and de-duplication keeps first occurrences, the
published arrays are identical whatever order the shards were produced in.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import store
from alignet_core.io.formats import AlignetTriplets, write_alignet_npz
from alignet_core.runtime.provenance import made_on
from alignet_core.sample.distinct import distinct_split
from alignet_core.sample.shards import SPLITS, ShardSpec

if TYPE_CHECKING:
    import zarr

log = logging.getLogger(__name__)


def _arrays_sha256(indices: np.ndarray, similarities: np.ndarray) -> str:
    """Hash of the published arrays' contents (stable across runs, unlike zip timestamps)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(similarities, dtype=np.float32)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


#: the Zarr copy of the published splits, inside the published folder
ZARR_COPY = "dataset.zarr"


#: rows per Zarr chunk of the published copy (24 MB of int64 indices)
ZARR_CHUNK_TRIPLETS = 1 << 20

#: the Zarr copy's array of the pool's file names, written once: a triplet's names are its rows' names
ZARR_IMAGES = "images/filenames"


def _write_zarr_split(group_url: str, name: str, indices: np.ndarray, similarities: np.ndarray) -> None:
    """Write one published split into the Zarr copy as group `<name>` with arrays `indices` (m, 3)
    int64 and `similarities` (m, 3) float32, one Zarr chunk of rows at a time; each chunk's bytes are
    those of a whole-array write. The file names are not repeated per triplet (`_write_zarr_images`):
    as variable-length strings they were 15M Python strings per 5M-triplet split, 5.8 s of Zarr's
    encoding each (`benchmarks.publish_split`), for bytes that `indices` already determine."""
    import zarr

    root = zarr.open_group(group_url, mode="a")
    g = root.create_group(name, overwrite=True)
    for key, arr in (("indices", np.asarray(indices, dtype=np.int64)),
                     ("similarities", np.asarray(similarities, dtype=np.float32))):
        _write_rows(g, key, arr)


def _write_zarr_images(group_url: str, filenames: np.ndarray) -> None:
    """Write the pool's file names (n,) once, as `images/filenames` (variable-length UTF-8, Zarr v3's
    string type): row i of the pool is index i of every split's `indices`."""
    import zarr

    root = zarr.open_group(group_url, mode="a")
    group, key = ZARR_IMAGES.split("/")
    names = np.asarray(filenames)
    names = names if names.dtype.kind == "U" else np.asarray(names.tolist(), dtype=str)  # e.g. StringDType
    _write_rows(root.create_group(group, overwrite=True), key, names)


def _write_rows(group: zarr.Group, key: str, arr: np.ndarray) -> None:
    """Create `group/key` shaped like `arr` (str arrays as Zarr's variable-length strings) and fill it
    one chunk of ZARR_CHUNK_TRIPLETS rows at a time."""
    rows = max(1, min(len(arr), ZARR_CHUNK_TRIPLETS))
    z = group.create_array(key, shape=arr.shape, dtype=str if arr.dtype.kind == "U" else arr.dtype,
                           chunks=(rows, *arr.shape[1:]))
    for lo in range(0, len(arr), rows):
        z[lo : lo + rows] = arr[lo : lo + rows]


def read_zarr_split(published_url: str, group: str, manifest: dict | None = None) -> AlignetTriplets:
    """Read split `group` (e.g. 'train_cluster_border_500') of a published version's Zarr copy, with
    each triplet's file names looked up from `images/filenames`: the same arrays as its .npz file.
    Versions published before that layout (names per triplet in the split's group) read the same way."""
    import zarr

    manifest = manifest if manifest is not None else store.read_manifest(published_url)
    info = manifest.get("zarr") or {}
    if group not in info.get("groups", []):
        raise InputError(f"{published_url}: the Zarr copy has no split {group!r}; it has {info.get('groups', [])}")
    root = zarr.open_group(store.join(published_url, info["path"]), mode="r")
    g = root[group]
    idx = np.asarray(g["indices"][:])
    if "filenames" in g:  # a version published before the names were stored once: (m, 3) per triplet
        names = np.asarray(g["filenames"][:])
    else:
        names = np.asarray(root[info.get("filenames", ZARR_IMAGES)][:])[idx]  # Zarr gives numpy's StringDType
    width = int(np.strings.str_len(names).max(initial=1))
    return AlignetTriplets(idx, names.astype(f"U{width}"), np.asarray(g["similarities"][:]))


def assemble_dataset(
    out_dir: str,
    specs: list[ShardSpec],
    filenames: np.ndarray,
    publish_url: str,
    sampling_names: dict[str, str],
    dedupe: bool = True,
    subfolder: str = "",
    extra: dict | None = None,
    top_up: Callable[[ShardSpec], object] | None = None,
    workers: int = 1,
) -> dict:
    """Publish the shards as official AligNet files: `train_<name>.npz`, `valid_<name>.npz`.

    filenames: (n,) str, the image pool's file names (row i ↔ index i). sampling_names maps a
    strategy to its official name, e.g. {'cluster_border': 'cluster_border_500'}. With
    `dedupe`, duplicate triplets (same three images in any order) are removed inside each split
    (first occurrence kept); valid triplets that also occur in train are always removed. With
    `top_up` (makes one shard's file; the stage's), each split is topped up to exactly the count its
    shards asked for, or an `InputError` says the pool cannot supply it (`distinct.distinct_split`).
    The same arrays are also written as a Zarr copy, `dataset.zarr/<split>_<name>/{indices,
    similarities}` with the pool's file names once as `dataset.zarr/images/filenames` (listed under the
    manifest's `zarr` key), for chunked readers (`read_zarr_split`).
    The files go into `publish_url/<subfolder>/` (e.g. `uncertainty_distillation`, the official
    layout); `manifest.json` sits at `publish_url` and lists each file's path relative to it.
    Everything is written into a temporary directory next to `publish_url`, with the manifest
    (counts, ties dropped, duplicates removed, sha256 per file, plus `extra`, e.g. the config and
    input keys of a dataset version), then moved into place by one rename. If `publish_url` is
    already complete its manifest is returned as is. `workers` threads publish that many strategies at
    once (the same bytes; memory grows by about one split's arrays per thread).
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
        "made_on": made_on(),  # same bytes are promised only for the same machine, kernels and threads
        "files": {},
        "strategies": {},
        **(extra or {}),
    }
    files_dir = store.join(tmp, subfolder) if subfolder else tmp
    prefix = f"{subfolder}/" if subfolder else ""
    try:
        zarr_url = store.join(files_dir, ZARR_COPY)
        _write_zarr_images(zarr_url, filenames)  # also creates the copy's root before the threads add groups

        def publish_strategy(strategy: str, name: str) -> tuple[dict, dict]:
            """One strategy's train and valid files: (its stats, its manifest entries by file name)."""
            stats: dict = {"name": name}
            entries: dict = {}
            train_keys = None
            for split in SPLITS:
                idx, sims, keys, st = distinct_split(
                    out_dir, [s for s in specs if s.strategy == strategy and s.split == split], len(filenames),
                    dedupe, train_keys if split == "valid" else None, top_up)
                train_keys = keys if split == "train" else train_keys
                fname = f"{split}_{name}.npz"
                url = store.join(files_dir, fname)
                write_alignet_npz(url, idx, filenames[idx], sims)
                _write_zarr_split(zarr_url, f"{split}_{name}", idx, sims)
                st["n_triplets"] = int(len(idx))
                st["file"] = fname
                stats[split] = st
                entries[fname] = {
                    "strategy": strategy,
                    "split": split,
                    "path": prefix + fname,
                    "n_triplets": int(len(idx)),
                    "sha256": store.file_sha256(url),
                    "arrays_sha256": _arrays_sha256(idx, sims),
                    "duplicates_drawn": st["duplicates_removed"],
                    "top_up_shards": st["top_up_shards"],
                }
            return stats, entries

        # strategies are independent (each its own files, keys and top-up shards): numpy's sorts, the
        # zip and Zarr writes and sha256 release the GIL, so threads overlap them
        with ThreadPoolExecutor(max(1, min(workers, len(strategies))), thread_name_prefix="publish") as pool:
            done = list(pool.map(publish_strategy, strategies, names))
        for strategy, (stats, entries) in zip(strategies, done):  # the manifest in strategy order, as before
            manifest["strategies"][strategy] = stats
            manifest["files"].update(entries)
        manifest["zarr"] = {
            "path": prefix + ZARR_COPY,
            "groups": sorted(f[: -len(".npz")] for f in manifest["files"]),
            "arrays": ["indices", "similarities"],
            "filenames": ZARR_IMAGES,
            "note": "the .npz files' arrays, one Zarr group per file (chunked; for Dask/xarray readers); a "
                    "triplet's file names are filenames[indices] (publish.read_zarr_split)",
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

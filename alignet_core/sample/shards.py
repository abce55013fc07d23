"""Shards of triplets, the unit of parallelism and of resume of stage 3.

1. `plan_shards` splits each strategy's train and valid counts into `ShardSpec`s. Train and
   valid draw from different seed streams, and each shard's generator depends only on
   (strategy, split seed, shard index), so the result never depends on the number of workers.
2. `run_shard` samples one shard (`strategies.sample_shard`), computes the teacher's similarities
   from the transformed store (`teacher.teacher_similarities`, reading only the needed rows),
   orders each triplet so image 2 is the odd one out, drops rows with a tied maximum, and writes
   `<out_dir>/shards/<name>.npz` atomically. An existing shard file is a finished shard: the
   call returns at once, so a killed run resumes without redoing or duplicating work.

`publish.assemble_dataset` then turns the finished shards into the official files.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np

from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.io import embedding_store, store
from alignet_core.io.formats import savez_reproducible
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
    store.replace_durably(fs, tmp, path)


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


def read_shard(url: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    try:
        with fsspec.open(url, "rb") as f:
            z = np.load(f, allow_pickle=False)
            return z["indices"], z["similarities"], int(z["n_requested"]), int(z["n_ties"])
    except FileNotFoundError:
        raise StoreError(f"shard {url!r} is missing: run its shard before assembling") from None
    except (KeyError, ValueError, OSError) as err:
        raise StoreError(f"shard {url!r} is unreadable ({err}); delete it and run the shard again") from None



"""The student's data: deterministic micro-batches of triplets (`TripletBatches`), images decoded
and preprocessed as the extraction does, and foreign datasets joined to the source by filenames.

The order of triplets is a pure function of (seed, step), so a run resumed from a checkpoint
follows exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from alignet_core.errors import ConfigError, InputError
from alignet_core.io import formats
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.images import load_image
from alignet_core.io.sources import ImageSource

log = logging.getLogger(__name__)

def decode_images(paths: list[str], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Decode and preprocess images with `io.images.load_image` (the extraction code):
    paths (u,) → (u, 3, H, W) float32. An unreadable image is an `InputError` naming it."""
    return torch.stack([transform(load_image(p)) for p in paths])


class TripletBatches(torch.utils.data.Dataset):
    """Deterministic micro-batches of triplets with each unique image decoded once.

    The triplets of optimizer step s are a pure function of (seed, s): epoch e = s // n_batches
    uses the permutation `default_rng([seed, e]).permutation(n)`, step s takes its
    (s % n_batches)-th slice of `batch_triplets` rows (the incomplete tail of an epoch is
    dropped). With `grad_accum` > 1 the step's triplets are cut into `grad_accum` equal
    micro-batches, so the data of a step does not depend on grad_accum.

    Item k (micro-batch k = step·grad_accum + j) is (images (u, 3, H, W) float32, rows (b, 3)
    int64 indices into images, teacher_sims (b, 3) float32, triplet ids (b,) int64 rows of the
    split). Indexable by any k ≥ 0, so a torch DataLoader over `range(start, stop)` with
    batch_size=None serves any stretch of a run, with any number of workers.

    split.indices are rows into the pool: row i is `source.records[i]`.
    """

    def __init__(
        self,
        split: AlignetTriplets,
        source: ImageSource,
        transform: Callable[[Any], torch.Tensor],
        batch_triplets: int,
        seed: int,
        grad_accum: int = 1,
        cache: bool = False,
    ) -> None:
        n = len(split)
        if batch_triplets <= 0 or grad_accum <= 0 or batch_triplets % grad_accum:
            raise ConfigError(
                f"distill.batch_triplets ({batch_triplets}) must be a positive multiple of "
                f"distill.grad_accum ({grad_accum})"
            )
        if n < batch_triplets:
            raise InputError(
                f"training split has {n} triplets, fewer than distill.batch_triplets={batch_triplets}"
            )
        n_pool = len(source)
        if n and (split.indices.min() < 0 or split.indices.max() >= n_pool):
            raise InputError(
                f"triplet indices must be rows of the image source [0, {n_pool}); got range "
                f"[{int(split.indices.min())}, {int(split.indices.max())}]"
            )
        self.indices = np.asarray(split.indices, dtype=np.int64)
        self.similarities = np.asarray(split.similarities, dtype=np.float32)
        self.paths = [str(r.path) for r in source.records]
        self.transform = transform
        self.batch_triplets = batch_triplets
        self.grad_accum = grad_accum
        self.micro = batch_triplets // grad_accum
        self.seed = int(seed)
        self.batches_per_epoch = n // batch_triplets
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._cache: torch.Tensor | None = None
        self._slot: np.ndarray | None = None
        if cache:  # every image the split uses, decoded once: (u, 3, H, W) float32 plus pool row → slot
            used = np.unique(self.indices)
            self._slot = np.full(n_pool, -1, dtype=np.int64)
            self._slot[used] = np.arange(len(used))
            self._cache = decode_images([self.paths[u] for u in used], transform)
            log.info("distill: %d training images decoded into memory (%.0f MiB)", len(used),
                     self._cache.numel() * 4 / 2**20)

    def __len__(self) -> int:
        """Micro-batches per epoch (indexing goes on past it into later epochs)."""
        return self.batches_per_epoch * self.grad_accum

    def step_triplets(self, step: int) -> np.ndarray:
        """Rows of the split used at optimizer step `step`: (batch_triplets,) int64."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[i * self.batch_triplets : (i + 1) * self.batch_triplets]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        step, j = divmod(int(k), self.grad_accum)
        ids = self.step_triplets(step)[j * self.micro : (j + 1) * self.micro]
        pool_rows = self.indices[ids]  # (b, 3)
        unique, inverse = np.unique(pool_rows, return_inverse=True)
        if self._cache is not None and self._slot is not None:
            images = self._cache[torch.from_numpy(self._slot[unique])]
        else:
            images = decode_images([self.paths[u] for u in unique], self.transform)
        rows = torch.from_numpy(inverse.reshape(pool_rows.shape).astype(np.int64))
        sims = torch.from_numpy(self.similarities[ids])
        return images, rows, sims, torch.from_numpy(ids.astype(np.int64))


def join_by_filenames(split: AlignetTriplets, source: ImageSource, what: str) -> AlignetTriplets:
    """Point a split's indices at the rows of `source` by its filenames (for datasets made
    elsewhere, whose indices number another image pool).

    Each file name is matched to an image id of the source, else to the base name of an image's
    path (a base name shared by several images never matches). A name found nowhere is an
    `InputError` naming how many are missing, with examples."""
    by_id: dict[str, int] = {}
    by_base: dict[str, int] = {}
    for row, rec in enumerate(source.records):
        by_id.setdefault(str(rec.id), row)
        base = posixpath.basename(str(rec.path))
        by_base[base] = -2 if base in by_base else row  # -2: ambiguous
    names, inverse = np.unique(split.filenames.ravel(), return_inverse=True)
    rows = np.array([by_id.get(n, by_base.get(posixpath.basename(n), -1)) for n in names.tolist()], dtype=np.int64)
    if (rows < 0).any():
        missing = names[rows < 0]
        raise InputError(
            f"{what}: {len(missing)} of {len(names)} filenames match no image of the source by id or file name "
            f"(e.g. {missing[:3].tolist()}); point source.path at the images the dataset was made from"
        )
    indices = rows[inverse].reshape(split.filenames.shape)
    return AlignetTriplets(indices, split.filenames, split.similarities, split.n_reordered)


def check_filenames(split: AlignetTriplets, source: ImageSource, what: str) -> None:
    """Refuse a split whose `filenames` disagree with the images its indices point at.

    An entry agrees when it is the image's id or has the base name of the image's path (datasets
    that carry no names, all '', are not checked). A dataset made from other images, or from the same
    images in another order, would otherwise train the student on the similarities of other images:
    an `InputError` names the count and a few examples, before any training."""
    names = split.filenames
    if names.size == 0 or not (names != "").any():
        return
    ids = source.ids()
    bases = np.asarray([posixpath.basename(str(r.path)) for r in source.records], dtype=str)
    idx = split.indices
    bad = (names != ids[idx]) & (names != "")
    if bad.any():  # a second chance by base name, for the entries that are not ids
        r, c = np.nonzero(bad)
        by_base = np.asarray([posixpath.basename(n) for n in names[r, c].tolist()], dtype=str) == bases[idx[r, c]]
        bad[r[by_base], c[by_base]] = False
    if bad.any():
        r, c = np.nonzero(bad)
        eg = [f"row {i}: index {idx[i, j]} is {ids[idx[i, j]]!r}, the file says {names[i, j]!r}"
              for i, j in zip(r[:3].tolist(), c[:3].tolist())]
        raise InputError(
            f"{what}: {len(r)} of {names.size} filenames disagree with the source's images at their indices "
            f"({'; '.join(eg)}); the dataset was made from other images or another order: point source.path at its "
            "images, or join by filenames (distill.join: filenames)"
        )


def join_mode(dataset: str | None, join: str) -> str:
    """How a split finds its images: `distill.join`, where 'auto' is 'filenames' for a dataset folder the
    pipeline did not publish (`distill.dataset`) and 'indices' for the pipeline's own."""
    if join != "auto":
        return join
    return "filenames" if dataset is not None else "indices"


def read_split(url: str, source: ImageSource, join: str) -> AlignetTriplets:
    """An official-format split (`formats.read_alignet_npz`) with its indices pointing at rows of `source`:
    as stored (join 'indices', our own datasets; the filenames are checked against those rows) or by the
    files' filenames (join 'filenames')."""
    if join == "filenames":
        return join_by_filenames(formats.read_alignet_npz(url), source, url)
    split = formats.read_alignet_npz(url, len(source))
    check_filenames(split, source, url)
    return split


def loader(
    dataset: torch.utils.data.Dataset, ks: Sequence[int], num_workers: int, device: torch.device
) -> Iterator[Any]:
    """Items `ks` of a map-style dataset (a `range`, or one rank's `parallel.RankMicroBatches`), in order,
    decoded by `num_workers` processes."""
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=ks,
            num_workers=num_workers,
            shuffle=False,
            pin_memory=device.type == "cuda",
        )
    )


class ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: Callable[[Any], torch.Tensor], batch_size: int) -> None:
        self.paths, self.transform, self.batch_size = paths, transform, batch_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_images(self.paths[i * self.batch_size : (i + 1) * self.batch_size], self.transform)

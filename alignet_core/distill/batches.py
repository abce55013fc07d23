"""The student's data: deterministic micro-batches of triplets (`TripletBatches`), each image decoded
and preprocessed as the extraction does (`models.embedding.decode_images`).

The order of triplets is a pure function of (seed, step), so a run resumed from a checkpoint
follows exactly the trajectory of an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from alignet_core.errors import ConfigError, InputError
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource
from alignet_core.models.embedding import decode_images

log = logging.getLogger(__name__)

class TripletBatches(torch.utils.data.Dataset):
    """Deterministic micro-batches of triplets with each unique image decoded once.

    The triplets of optimizer step s are a pure function of (seed, s): epoch e = s // n_batches
    uses the permutation `default_rng([seed, e]).permutation(n)`, step s takes its
    (s % n_batches)-th slice of `batch_triplets` rows (the incomplete tail of an epoch is
    dropped). With `grad_accum` > 1 the step's triplets are cut into `grad_accum` equal
    micro-batches, so the data of a step does not depend on grad_accum.

    With `cache` every image the split uses is decoded once and kept; with `encode` (e.g. a student's
    frozen front, `models.partial`) each is decoded once, passed through it, and its output kept and
    served in place of the image.

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
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        if cache or encode is not None:  # every image the split uses, decoded once, plus pool row → slot
            used = np.unique(self.indices)
            self._slot = np.full(n_pool, -1, dtype=np.int64)
            self._slot[used] = np.arange(len(used))
            self._cache = self._decode_all([self.paths[u] for u in used], encode)
            log.info("distill: %d training images %s into memory (%.0f MiB)", len(used),
                     "decoded" if encode is None else "through the frozen front",
                     self._cache.numel() * 4 / 2**20)

    def _decode_all(self, paths: list[str], encode: Callable[[torch.Tensor], torch.Tensor] | None,
                    chunk: int = 256) -> torch.Tensor:
        """(u, 3, H, W) images, or (u, ...) `encode`d images, decoded `chunk` at a time (u images at full
        resolution are never all held at once when they are encoded)."""
        if encode is None:
            return decode_images(paths, self.transform)
        return torch.cat([encode(decode_images(paths[i : i + chunk], self.transform))
                          for i in range(0, len(paths), chunk)])

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

"""Official-format splits joined to an image source: by their stored indices (the pipeline's own
datasets; the filenames are checked against those rows) or by their filenames (datasets made
elsewhere, whose indices number another image pool)."""

from __future__ import annotations

import posixpath

import numpy as np

from alignet_core.errors import InputError
from alignet_core.io import formats
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource


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

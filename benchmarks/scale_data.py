"""Synthetic embeddings with a known cluster structure, and human-like triplets over them, for the scale
benchmark (`benchmarks.scale`).

The structure: `supers` superordinate categories, each holding `groups / supers` generating groups. Row i
belongs to group g(i) (uniform) and is, in float16,

    x_i = a · S[super(g)] + G[g] + ε_i,    S, G, ε ~ N(0, 1) per coordinate (G scaled by `group_scale`),

so k-means with k = `groups` has a known answer (the groups: ARI against them measures recovery) and the
superordinate directions are present but weak (`a = teacher_super`). The human-like rule weighs them more:
a person's latent for group g is h_g = b · S[super(g)] + G[g] with b = `human_super` > a, so human
odd-one-out choices follow superordinate categories first (as THINGS choices do, docs/method.md) and the
transform has something to find.

Rows are made in fixed blocks of `BLOCK_ROWS`; block b draws from a generator seeded by (seed, b) alone,
its group ids first and its noise second, so (1) any row range is the same whatever chunks it is written
in, (2) the first m rows of a larger n are the rows of n = m, and (3) group labels come without drawing
the noise. Memory: one block (a few tens of MB) plus the output chunk.

Files (`write_embeddings`, `write_human`): `emb.npy` (n, dim) float16 (written through a memory map),
`ids.txt` (`img_0000000`, one per line, row order), `labels.txt` (`g000`, the generating group, one per
line: `between_class` samples by it, and it is the reference for recovery), and a THINGS-format triplet
file over `n_objects` objects (`object,image_id` table: each object is `images_per_object` images of one
group) with the rule's choice probabilities.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: rows per generator block (the unit of determinism; chunks of any size are cut from blocks)
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class ScaleSpec:
    """What the generator makes; every field enters the files' identity (`spec.json`)."""

    n: int
    dim: int = 1280
    groups: int = 500
    supers: int = 20
    group_scale: float = 0.5
    teacher_super: float = 0.5
    human_super: float = 2.0
    seed: int = 0
    n_objects: int = 1854
    images_per_object: int = 4
    n_triplets: int = 100_000
    human_beta: float = 8.0  # inverse temperature of the rule's choice (cosine similarities × beta)

    def __post_init__(self) -> None:
        if self.n <= 0 or self.dim <= 0 or self.groups <= 0 or self.supers <= 0 or self.groups % self.supers:
            raise ValueError(f"ScaleSpec: n, dim, groups, supers must be positive and supers divide groups: {self}")


def latent(spec: ScaleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(superordinate directions (supers, dim), group offsets (groups, dim)) float32, from the seed alone."""
    rng = np.random.default_rng([spec.seed, 0])
    supers = rng.standard_normal((spec.supers, spec.dim), dtype=np.float32)
    groups = spec.group_scale * rng.standard_normal((spec.groups, spec.dim), dtype=np.float32)
    return supers, groups


def super_of_group(spec: ScaleSpec) -> np.ndarray:
    """(groups,) int64: the superordinate category of each group (groups dealt round-robin)."""
    return np.arange(spec.groups, dtype=np.int64) % spec.supers


def _block(spec: ScaleSpec, b: int, with_rows: bool, centers: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Block b: (group ids (BLOCK_ROWS,) int64, rows (BLOCK_ROWS, dim) float16 or None)."""
    rng = np.random.default_rng([spec.seed, 1, b])
    groups = rng.integers(0, spec.groups, BLOCK_ROWS, dtype=np.int64)
    if not with_rows:
        return groups, None
    x = rng.standard_normal((BLOCK_ROWS, spec.dim), dtype=np.float32)
    x += centers[groups]
    return groups, x.astype(np.float16)


def teacher_centers(spec: ScaleSpec) -> np.ndarray:
    """(groups, dim) float32: a · S[super(g)] + G[g], the mean teacher embedding of each group."""
    s, g = latent(spec)
    return spec.teacher_super * s[super_of_group(spec)] + g


def rows(spec: ScaleSpec, start: int, stop: int, centers: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) of the embeddings, (stop − start, dim) float16."""
    centers = teacher_centers(spec) if centers is None else centers
    out = np.empty((stop - start, spec.dim), dtype=np.float16)
    for b in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)):
        lo = b * BLOCK_ROWS
        a, z = max(start, lo), min(stop, lo + BLOCK_ROWS)
        out[a - start : z - start] = _block(spec, b, True, centers)[1][a - lo : z - lo]
    return out


def group_labels(spec: ScaleSpec) -> np.ndarray:
    """(n,) int64: the generating group of every row."""
    out = np.empty(spec.n, dtype=np.int64)
    for b in range(-(-spec.n // BLOCK_ROWS)):
        lo = b * BLOCK_ROWS
        hi = min(spec.n, lo + BLOCK_ROWS)
        out[lo:hi] = _block(spec, b, False, None)[0][: hi - lo]
    return out


def image_id(i: int) -> str:
    return f"img_{i:07d}"


def _spec_matches(folder: Path, spec: ScaleSpec) -> bool:
    try:
        return json.loads((folder / "spec.json").read_text()) == asdict(spec)
    except (OSError, ValueError):
        return False


def write_embeddings(spec: ScaleSpec, folder: Path, chunk_rows: int = 65536) -> dict[str, Path]:
    """Write `emb.npy`, `ids.txt`, `labels.txt` (and `spec.json`, last) into `folder`, chunk by chunk
    through a memory map; a folder whose `spec.json` equals `spec` is reused as is."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"embeddings": folder / "emb.npy", "ids": folder / "ids.txt", "labels": folder / "labels.txt"}
    if _spec_matches(folder, spec):
        return paths
    (folder / "spec.json").unlink(missing_ok=True)
    centers = teacher_centers(spec)
    tmp = folder / "emb.npy.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(spec.n, spec.dim))
    for start in range(0, spec.n, chunk_rows):
        stop = min(spec.n, start + chunk_rows)
        out[start:stop] = rows(spec, start, stop, centers)
        out.flush()
    del out
    os.replace(tmp, paths["embeddings"])
    labels = group_labels(spec)
    paths["ids"].write_text("".join(f"{image_id(i)}\n" for i in range(spec.n)))
    paths["labels"].write_text("".join(f"g{g:03d}\n" for g in labels.tolist()))
    (folder / "spec.json").write_text(json.dumps(asdict(spec)))
    return paths


def object_images(spec: ScaleSpec, labels: np.ndarray) -> np.ndarray:
    """(n_objects, images_per_object) int64 rows: object o shows group o mod groups, and takes the next
    unused images of that group in row order. `ValueError` when a group has too few rows."""
    by_group = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[by_group], np.arange(spec.groups))
    counts = np.bincount(labels, minlength=spec.groups)
    out = np.empty((spec.n_objects, spec.images_per_object), dtype=np.int64)
    for o in range(spec.n_objects):
        g, rank = o % spec.groups, o // spec.groups
        lo = rank * spec.images_per_object
        if lo + spec.images_per_object > counts[g]:
            raise ValueError(f"group {g} has {counts[g]} rows: too few for {spec.n_objects} objects of "
                             f"{spec.images_per_object} images; use a larger n")
        out[o] = by_group[starts[g] + lo : starts[g] + lo + spec.images_per_object]
    return out


def human_latent(spec: ScaleSpec) -> np.ndarray:
    """(n_objects, dim) float32 unit rows: each object's latent under the human-like rule (its group's
    superordinate direction weighted by `human_super`, plus the group's offset), from the seed alone."""
    s, g = latent(spec)
    obj_group = np.arange(spec.n_objects) % spec.groups
    h = spec.human_super * s[super_of_group(spec)[obj_group]] + g[obj_group]
    return h / np.linalg.norm(h, axis=1, keepdims=True)


def human_triplets(spec: ScaleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(triplets (t, 3) int64 objects, the chosen pair first and the odd one last; probabilities (t, 3)
    float32 over pairs [(0,1), (0,2), (1,2)] of the written order) by the human-like rule: a softmax of
    `human_beta` × cosine similarity of the objects' human latents, one choice sampled per triplet."""
    h = human_latent(spec)
    rng = np.random.default_rng([spec.seed, 2])
    t = np.zeros((0, 3), dtype=np.int64)
    while len(t) < spec.n_triplets:  # three distinct objects per triplet
        draw = rng.integers(0, spec.n_objects, (spec.n_triplets, 3), dtype=np.int64)
        t = np.concatenate([t, draw[(draw[:, 0] != draw[:, 1]) & (draw[:, 0] != draw[:, 2]) & (draw[:, 1] != draw[:, 2])]])
    t = t[: spec.n_triplets]
    a, b, c = h[t[:, 0]], h[t[:, 1]], h[t[:, 2]]
    sims = spec.human_beta * np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1).astype(np.float64)
    p = np.exp(sims - sims.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    choice = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(1).clip(0, 2)
    # reorder each triplet so the chosen pair is (0, 1): pair 0 = (0,1) keeps, 1 = (0,2) swaps 1↔2, 2 = (1,2)
    order = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])[choice]
    pair_order = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])[choice]  # the pairs' new positions
    return np.take_along_axis(t, order, 1), np.take_along_axis(p, pair_order, 1).astype(np.float32)


def write_human(spec: ScaleSpec, folder: Path, labels: np.ndarray) -> dict[str, Path]:
    """Write the THINGS-format `triplets.txt`, `probabilities.npy` and the `objects.csv` table."""
    paths = {"triplets": folder / "triplets.txt", "probabilities": folder / "probabilities.npy",
             "objects": folder / "objects.csv"}
    imgs = object_images(spec, labels)
    with open(paths["objects"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "image_id"])
        for o, row in enumerate(imgs.tolist()):
            w.writerows([o, image_id(i)] for i in row)
    trip, probs = human_triplets(spec)
    paths["triplets"].write_text("".join(f"{i} {j} {k}\n" for i, j, k in trip.tolist()))
    np.save(paths["probabilities"], probs)
    return paths

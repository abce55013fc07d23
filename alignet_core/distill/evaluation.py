"""The student's accuracy: triplet accuracy against the teacher on held-out triplets and zero-shot
odd-one-out accuracy on the test fold's human (or proxy) triplets, each image the evaluation needs
embedded once.

Whether the test-fold figure is held-out is not decided here but by what the student trained on: the
distill stage labels it (`DistillMetrics.human_heldout`, `human.heldout.heldout_label`): held-out when
no test-fold image is in its training triplets (`human.teacher: heldout` makes the sampler leave them
out), "not held-out (the published teacher saw every triplet)" under `human.teacher: all`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alignet_core.errors import InputError
from alignet_core.human.data import HumanTest
from alignet_core.human.triplets import object_embeddings
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource
from alignet_core.models.embedding import embed_images
from alignet_core.models.student import TripletStudent
from alignet_core.stats import metrics


@dataclass(frozen=True)
class StudentOutcomes:
    """Per-triplet outcomes of one model under one similarity: by_sampling[name] (t,) bool against
    the teacher's odd one; human (t,) bool on the held-out human triplets (None without them)."""

    by_sampling: dict[str, np.ndarray]
    human: np.ndarray | None


def student_outcomes(
    model: TripletStudent | nn.Module,
    valids: dict[str, AlignetTriplets],
    test: HumanTest | None,
    source: ImageSource,
    device: torch.device,
    use_head: bool = True,
    max_triplets: int | None = None,
    num_workers: int = 0,
    similarities: tuple[str, ...] = ("dot",),
    batch_size: int = 256,
    image_size: int | None = None,
) -> dict[str, StudentOutcomes]:
    """Outcomes on the first `max_triplets` rows of each held-out split (rows ordered with the
    teacher's odd one out last; right when the model's s01 is strictly largest) and on the held-out
    human triplets (an object is the mean of its images' embeddings), for each similarity ('dot',
    'cosine'), embedding every image needed once.

    use_head=False scores the backbone's pooled pre-logits (the pretrained student before
    training; a plain timm model is always scored that way). image_size: input resolution; None →
    the student's own (`TripletStudent.image_size`, else the backbone's pretrained input size).
    """
    n_pool = len(source)
    idx = {name: np.asarray(v.indices[:max_triplets], dtype=np.int64) for name, v in valids.items()}
    for name, rows in idx.items():
        if len(rows) and (rows.min() < 0 or rows.max() >= n_pool):
            raise InputError(f"{name}: evaluation triplets must index the image source [0, {n_pool}); "
                             f"got [{int(rows.min())}, {int(rows.max())}]")
    needed = [rows.ravel() for rows in idx.values()]
    objs = np.zeros(0, dtype=np.int64)
    if test is not None:
        objs = np.unique(test.triplets)
        needed.append(np.flatnonzero(np.isin(test.object_of_image, objs)))
    used = np.unique(np.concatenate(needed)) if needed else np.zeros(0, dtype=np.int64)
    emb = embed_images(model, [source.records[int(r)].path for r in used], device, batch_size, use_head,
                       image_size, num_workers)
    pool = np.zeros((n_pool, emb.shape[1]), dtype=np.float32)  # (n, d): rows not needed stay zero
    pool[used] = emb
    obj_emb = None
    if test is not None:
        img = np.flatnonzero(np.isin(test.object_of_image, objs))
        obj_emb = object_embeddings(pool[img], np.searchsorted(objs, test.object_of_image[img]), len(objs))
    out = {}
    for sim in similarities:
        by = {name: metrics.odd_one_out_correct(pool, rows, sim) for name, rows in idx.items()}
        human = None if obj_emb is None else metrics.odd_one_out_correct(obj_emb, np.searchsorted(objs, test.triplets), sim)
        out[sim] = StudentOutcomes(by_sampling=by, human=human)
    return out


def evaluate_student(
    model: TripletStudent | nn.Module,
    split: AlignetTriplets,
    source: ImageSource,
    device: torch.device,
    batch_size: int = 256,
    use_head: bool = True,
    max_triplets: int | None = None,
    image_size: int | None = None,
) -> float:
    """Triplet accuracy of the student against the teacher on one held-out split (see
    `student_outcomes`); NaN for an empty split."""
    out = student_outcomes(model, {"split": split}, None, source, device, use_head, max_triplets,
                           batch_size=batch_size, image_size=image_size)["dot"]
    correct = out.by_sampling["split"]
    return float(correct.mean()) if len(correct) else float("nan")

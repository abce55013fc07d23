"""The student's accuracy: triplet accuracy against the teacher on held-out triplets and zero-shot
odd-one-out accuracy on held-out human triplets, each image the evaluation needs embedded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alignet_core import models
from alignet_core.distill.batches import ImageList, loader
from alignet_core.distill.student import TripletStudent, eval_transform
from alignet_core.errors import InputError
from alignet_core.evaluate import metrics
from alignet_core.hardware import autocast_dtype
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource
from alignet_core.transform.human import object_embeddings
from alignet_core.transform.human_data import HumanTest


@torch.no_grad()
def embed_images(
    model: TripletStudent | nn.Module,
    paths: list[str],
    device: torch.device,
    batch_size: int = 256,
    use_head: bool = True,
    image_size: int | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Embeddings of images: (u,) paths → (u, d) float32 (head outputs, or pooled pre-logits of
    the backbone with use_head=False or a plain timm model)."""
    is_student = isinstance(model, TripletStudent)
    backbone = model.backbone if is_student else model
    if image_size is None and is_student:
        image_size = model.image_size
    transform = eval_transform(backbone, image_size)
    was_training = model.training
    model.eval().to(device)
    amp = autocast_dtype(device)
    out = []
    try:
        n_batches = -(-len(paths) // batch_size)
        for images in loader(ImageList(paths, transform, batch_size), range(n_batches), num_workers, device):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if is_student:
                    e = model.embed(images, use_head=use_head)
                else:
                    e = models.pooled_features(model, images)
            out.append(e.float().cpu().numpy())
    finally:
        model.train(was_training)
    if out:
        return np.concatenate(out)
    width = model.head.out_features if is_student and use_head else models.feature_dim(backbone)
    return np.zeros((0, width), np.float32)


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

"""Images through a model: decoding and preprocessing as the extraction does, batched loading, and
the embeddings of a list of images under a student (head outputs) or any timm backbone (pooled
pre-logits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from alignet_core.hardware import autocast_dtype
from alignet_core.io.images import load_image
from alignet_core.models import factory as models
from alignet_core.models.student import TripletStudent, eval_transform


def decode_images(paths: list[str], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Decode and preprocess images with `io.images.load_image` (the extraction code):
    paths (u,) → (u, 3, H, W) float32. An unreadable image is an `InputError` naming it."""
    return torch.stack([transform(load_image(p)) for p in paths])


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

"""The student: a pretrained timm backbone whose pooled pre-logits feed a *new* linear head
(`TripletStudent`, as the reference's `bv_wrapper.py`); the student's similarity of two images is
the plain dot product of their head outputs (no normalization).

Choices the reference leaves open, made here:
- The backbone runs in eval mode during training: BatchNorm keeps its pretrained running
  statistics (its affine weights still train) and there is no dropout. The reference student
  (a ViT) has neither, training batches of a few dozen triplets give poor batch statistics, and
  the embedding the student is trained on is then exactly the one evaluated and exported.
- The head is initialised like flax's `nn.Dense` in the reference: LeCun-normal weights
  (std 1/√fan_in) and zero bias, from a generator seeded by the run's seed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from alignet_core.errors import ConfigError, StoreError
from alignet_core.models import factory as models

STUDENT_FILE = "student.safetensors"  # the exported backbone
HEAD_FILE = "head.safetensors"  # the exported head
LOG_FILE = "train_log.json"  # written last: a folder with it is a finished student


class StudentSpec(Protocol):
    """What builds a student (the `distill` config section has these fields)."""

    student: str
    weights: str | None
    head_dim: int
    image_size: int | None


def read_train_log(out_dir: str) -> dict[str, Any] | None:
    """The finished run's log in out_dir (dict with 'complete': True), or None if there is none."""
    path = os.path.join(out_dir, LOG_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, STUDENT_FILE))):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("complete") else None


class TripletStudent(nn.Module):
    """A timm backbone plus a new linear triplet head.

    forward(images (b, 3, H, W) float32) → (b, head_dim) float: the head outputs whose dot
    products are the student's similarities. `embed(images, use_head=False)` returns the
    backbone's pooled pre-logits (b, feature_dim) instead (the pretrained model's own space).
    `image_size` (optional) records the square input resolution the student is trained and
    evaluated at; None means the backbone's own pretrained input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_dim: int,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if head_dim <= 0:
            raise ConfigError(f"distill.head_dim: expected a positive width, got {head_dim}")
        self.backbone = backbone
        p = models.feature_dim(backbone)
        self.head = nn.Linear(p, head_dim)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():  # flax nn.Dense default: lecun_normal kernel, zero bias
            self.head.weight.copy_(torch.randn(head_dim, p, generator=g) / math.sqrt(p))
            self.head.bias.zero_()
        self.image_size = image_size

    def embed(self, images: torch.Tensor, use_head: bool = True) -> torch.Tensor:
        """images (b, 3, H, W) float → (b, head_dim) with the head, else (b, feature_dim)."""
        f = models.pooled_features(self.backbone, images)
        return self.head(f) if use_head else f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, 3, H, W) float → head outputs (b, head_dim)."""
        return self.embed(images, use_head=True)

    def train(self, mode: bool = True) -> "TripletStudent":
        """Only the flag changes: the backbone always runs in eval mode (frozen BN statistics,
        no dropout), see the module docstring."""
        super().train(mode)
        self.backbone.eval()
        return self


def eval_transform(model: nn.Module, image_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The model's eval transform (RGB PIL → (3, H, W) float32), optionally at a square
    `image_size` instead of the model's pretrained input size (same interpolation, crop
    fraction, mean and std)."""
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"distill.image_size: expected a positive number of pixels, got {image_size}")
    return models.build_transform(model, image_size)


def build_student(cfg: StudentSpec, seed: int) -> TripletStudent:
    """The untrained student of a run: `cfg.student` with `cfg.weights` plus a new head of
    width `cfg.head_dim` (initialised from `seed`), at `cfg.image_size` when set."""
    # random-init backbones (weights=None) draw from torch's global RNG: fix it by the seed
    # without touching the caller's RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        backbone = models.create_model(cfg.student, cfg.weights)
    return TripletStudent(backbone, cfg.head_dim, cfg.image_size, seed=seed)


def input_size(student: TripletStudent) -> tuple[int, int, int]:
    if student.image_size is not None:
        return (3, int(student.image_size), int(student.image_size))
    return tuple(models.data_config(student.backbone)["input_size"])  # type: ignore[return-value]


def load_student(out_dir: str, cfg: StudentSpec) -> TripletStudent:
    """The trained student of a finished run in out_dir (eval mode, on CPU).

    Builds `cfg.student` with random init and loads out_dir/student.safetensors and
    out_dir/head.safetensors strictly; the input resolution is the one the run used.
    """
    out_dir = out_dir.removeprefix("file://")
    done = read_train_log(out_dir)
    if done is None:
        raise StoreError(f"{out_dir!r} holds no finished distillation run (no {STUDENT_FILE} + complete {LOG_FILE})")
    backbone = models.create_model(cfg.student, None)
    try:
        backbone.load_state_dict(load_file(os.path.join(out_dir, STUDENT_FILE)), strict=True)
        head = load_file(os.path.join(out_dir, HEAD_FILE))
    except (RuntimeError, OSError) as err:
        raise StoreError(f"{out_dir!r}: the saved student does not fit model {cfg.student!r}: {err}") from None
    if "weight" not in head or head["weight"].ndim != 2:
        raise StoreError(f"{out_dir!r}: {HEAD_FILE} must hold 'weight' (head_dim, p) and 'bias'")
    image_size = done.get("image_size", cfg.image_size)
    student = TripletStudent(backbone, int(head["weight"].shape[0]), image_size)
    try:
        student.head.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise StoreError(f"{out_dir!r}: {HEAD_FILE} does not fit the backbone: {err}") from None
    return student.eval()

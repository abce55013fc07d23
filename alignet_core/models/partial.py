"""Training the last blocks of a student only (`distill.train_blocks`): the frozen front of the
backbone runs once per training image, and a step costs only the part that trains.

The AligNet reference finetunes the whole student. On a CPU that is most of the demo's time: a
Lite0 step at 64 px is ~0.35 s, of which the last 4 of its 16 blocks with the head layers take
~0.08 s and the head layers alone ~0.01 s (`benchmarks.partial_student`). The backbone runs in
eval mode during training (`models.student`), so the frozen front is a fixed function of the image:
its outputs can be computed once and reused on every step without changing the trained part's
gradients. The exported student is the whole backbone (frozen front + trained blocks) and the head,
as after a full finetune.

Works for timm models built as a stem, a `blocks` sequence and head layers, in that order (timm's
`EfficientNet` class: EfficientNet, EfficientNet-Lite, MobileNet V2, MixNet, ...: `conv_stem`, `bn1`,
`blocks`, `conv_head`, `bn2`, `global_pool`); others (MobileNet V3, whose head layers come after the
pooling; ResNets; ViTs) are refused with a one-line error.
"""

from __future__ import annotations

import torch
from torch import nn

from alignet_core.errors import ConfigError
from alignet_core.models.student import TripletStudent

#: the backbone attributes `flat_blocks`, `front` and `TrainedPart` use, in forward order
LAYOUT = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def flat_blocks(backbone: nn.Module, name: str = "the student") -> list[nn.Module]:
    """The backbone's blocks in forward order (timm's `blocks` stages flattened), or a ConfigError for a
    model without the stem/blocks/head-layers layout."""
    missing = [a for a in LAYOUT if not hasattr(backbone, a)]
    if missing:
        raise ConfigError(f"distill.train_blocks: {name} ({type(backbone).__name__}) has no {missing}; training "
                          "the last blocks only works for timm's EfficientNet-class models "
                          f"({', '.join(LAYOUT)}); set distill.train_blocks to null to train the whole student")
    out: list[nn.Module] = []
    for stage in backbone.blocks:
        out.extend(stage if isinstance(stage, nn.Sequential) else [stage])
    return out


def check_count(n: int, blocks: list[nn.Module]) -> None:
    """`distill.train_blocks` must name 0 to all of the student's blocks."""
    if not 0 <= n <= len(blocks):
        raise ConfigError(f"distill.train_blocks: expected 0 to {len(blocks)} (the student's blocks), got {n}")


def check_train_blocks(student: str, n: int) -> None:
    """Preflight: the student `student` (a timm name) has the layout and at least `n` blocks (its
    architecture built at random init, no weights read)."""
    from alignet_core.models import factory as models

    check_count(n, flat_blocks(models.create_model(student, None), f"distill.student {student!r}"))


class TrainedPart(nn.Module):
    """The trained part of a student: its last `n` blocks, the backbone's head layers and the triplet head.

    forward(front outputs (b, c, h, w)) → (b, head_dim), what the whole student gives for those images.
    Holds the student's own modules (shared parameters), so training it trains the student.
    """

    def __init__(self, student: TripletStudent, n: int) -> None:
        super().__init__()
        blocks = flat_blocks(student.backbone)
        check_count(n, blocks)
        bb = student.backbone
        self.blocks = nn.Sequential(*blocks[len(blocks) - n :])
        self.conv_head, self.bn2, self.global_pool = bb.conv_head, bb.bn2, bb.global_pool
        self.head = student.head
        self.train(student.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.bn2(self.conv_head(self.blocks(x)))))

    def train(self, mode: bool = True) -> "TrainedPart":
        """As `TripletStudent.train`: the backbone's layers always run in eval mode (frozen BatchNorm
        statistics, no dropout or drop-path), so the front's outputs are a fixed function of the image."""
        super().train(mode)
        for m in (self.blocks, self.conv_head, self.bn2, self.global_pool):
            m.eval()
        return self


def freeze_front(student: TripletStudent, n: int) -> tuple[TrainedPart, nn.Module]:
    """Freeze all but the last `n` blocks of the student's backbone (with its head layers and the triplet
    head): returns (the trained part, the frozen front as one module mapping images to the trained part's
    input). Parameters of the front get requires_grad False, so the optimizer leaves them alone."""
    part = TrainedPart(student, n)
    bb = student.backbone
    blocks = flat_blocks(bb)
    front = nn.Sequential(bb.conv_stem, bb.bn1, *blocks[: len(blocks) - n]).eval()
    trained = {id(p) for p in part.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trained)
    return part, front


@torch.no_grad()
def front_outputs(front: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    """The frozen front's outputs for images (u, 3, H, W), `batch` at a time on `device`, as a CPU float32
    tensor (u, c, h, w)."""
    parts = [front(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(parts) if parts else images.new_zeros((0,))

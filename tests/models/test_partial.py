"""Training a student's last blocks only (`models.partial`, `distill.train_blocks`): the trained part on the
frozen front's outputs is the whole student, its gradients are the whole student's with the front frozen,
and models without the layout, counts out of range and the harmonizer are refused.

Real timm models at random init (32 px): EfficientNet-Lite0 (the demo's student) and MobileNet V2.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from alignet_core.config.distill import DistillConfig
from alignet_core.errors import ConfigError
from alignet_core.models.partial import flat_blocks, freeze_front, front_outputs
from alignet_core.models.student import build_student

MODELS = ("tf_efficientnet_lite0", "mobilenetv2_050")


def _student(name: str, seed: int = 0):
    cfg = DistillConfig(student=name, weights=None, head_dim=16, image_size=32)
    return build_student(cfg, seed).train()


@pytest.mark.parametrize("name", MODELS)
def test_the_trained_part_on_the_fronts_outputs_is_the_whole_student(name: str) -> None:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for n in (0, 3, len(flat_blocks(_student(name).backbone))):
        student = _student(name)
        with torch.no_grad():
            whole = student(x)
        part, front = freeze_front(student, n)
        got = part(front_outputs(front, x, torch.device("cpu"), batch=6))
        assert torch.equal(got.detach(), whole), (name, n)  # the same operations in the same order


def test_gradients_are_the_whole_students_with_the_front_frozen() -> None:
    """One loss, two ways: the trained part on cached front outputs, and the whole student with the front's
    parameters frozen by hand: the same gradient for every trained parameter, and none for the front."""
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = _student(MODELS[0])
    part_ref, _ = freeze_front(ref, 4)  # freezes by hand the same parameters
    ref(x).square().sum().backward()
    student = _student(MODELS[0])
    part, front = freeze_front(student, 4)
    part(front_outputs(front, x, torch.device("cpu"))).square().sum().backward()
    trained = {id(p) for p in part.parameters()}
    assert 0 < len(trained) < len(list(student.parameters()))
    for (name, p), (_, q) in zip(student.named_parameters(), ref.named_parameters()):
        if id(p) in trained:
            assert p.requires_grad and p.grad is not None and torch.equal(p.grad, q.grad), name
        else:
            assert not p.requires_grad and p.grad is None and q.grad is None, name
    assert {id(p) for p in part_ref.parameters()} == {id(p) for p in ref.parameters() if p.requires_grad}


def test_the_backbone_layers_stay_in_eval_mode() -> None:
    """As in the whole student: frozen BatchNorm statistics, no drop-path, whatever `.train()` says."""
    student = _student(MODELS[0])
    part, front = freeze_front(student, 2)
    part.train()
    assert part.training and part.head.training
    assert not any(m.training for m in (*part.blocks.modules(), part.conv_head, part.bn2, *front.modules()))
    stats = {k: v.clone() for k, v in student.backbone.state_dict().items() if "running" in k}
    part(front_outputs(front, torch.randn(4, 3, 32, 32), torch.device("cpu")))
    assert all(torch.equal(student.backbone.state_dict()[k], v) for k, v in stats.items())


def test_models_without_the_layout_and_counts_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"distill.train_blocks: the student \(ResNet\) has no \['conv_stem', "
                                          r"'blocks', 'conv_head', 'bn2'\]; .* set distill.train_blocks to null"):
        freeze_front(_student("resnet10t"), 1)
    with pytest.raises(ConfigError, match=r"the student \(MobileNetV3\) has no \['bn2'\]"):  # its head layers follow the pool
        freeze_front(_student("mobilenetv3_small_050"), 1)
    with pytest.raises(ConfigError, match=r"distill.train_blocks: expected 0 to 16 \(the student's blocks\), got 17"):
        freeze_front(_student(MODELS[0]), 17)
    with pytest.raises(ValidationError, match="distill.harmonize: the harmonizer needs the gradient of the whole "
                                              "student with respect to its input"):
        DistillConfig(train_blocks=2, harmonize={})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        DistillConfig(train_blocks=-1)

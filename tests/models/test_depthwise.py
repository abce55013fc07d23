"""The batched depthwise weight gradient (`alignet_core.models.depthwise`): the same function as torch's
convolution, its gradients within float32 rounding of the exact sum, swapped into a student without changing
its parameters."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from alignet_core.config.distill import DistillConfig
from alignet_core.models.depthwise import DepthwiseConv2d, _worth_it, use_fast_depthwise_grad
from alignet_core.models.student import build_student
from tests.models._swap_runs import run_pair
from tests.numerics import U32

# (batch, channels, height, width, kernel, stride, TF-'SAME' padding): the demo student's small maps (batched
# gradient) and larger ones (torch's), channels-last inputs among them
CASES = [
    (6, 24, 2, 2, 5, 1, False),
    (6, 24, 4, 4, 5, 1, False),
    (5, 16, 7, 7, 5, 2, True),
    (5, 16, 8, 8, 5, 2, True),
    (4, 12, 8, 8, 5, 1, False),
    (4, 12, 2, 2, 3, 1, False),
    (3, 8, 9, 9, 3, 2, True),
    (3, 8, 16, 16, 3, 1, False),
    (2, 8, 40, 40, 5, 1, False),
]


def _conv(c: int, k: int, s: int, same: bool, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    if same:
        return Conv2dSame(c, c, k, stride=s, groups=c, bias=True)
    return nn.Conv2d(c, c, k, stride=s, padding=k // 2, groups=c, bias=True)


@pytest.mark.numerics
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n,c,h,w,k,s,same", CASES)
def test_gradients_are_the_exact_sums_within_float32_rounding(n, c, h, w, k, s, same, channels_last):
    """Outputs, input and bias gradients: torch's own (same bits). Weight gradient: each entry is a sum of
    K = n·Ho·Wo products g·x̃; a float32 evaluation in any order lies within γ_{K+1}·Σ|g·x̃| of the exact sum
    (γ_m = m·u/(1 − m·u), u = 2⁻²⁴), Σ|g·x̃| being the same gradient of |g| and |x| in float64."""
    conv = _conv(c, k, s, same, seed=n * 100 + c)
    fast = DepthwiseConv2d(conv, same)
    gen = torch.Generator().manual_seed(h * 10 + k)
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = conv(xa)
    g = torch.randn(ya.shape, generator=gen)
    (ga_x, ga_w, ga_b) = torch.autograd.grad(ya, (xa, conv.weight, conv.bias), g)
    yb = fast(xb)
    (gb_x, gb_w, gb_b) = torch.autograd.grad(yb, (xb, fast.weight, fast.bias), g)
    assert torch.equal(ya, yb)
    assert torch.equal(ga_x, gb_x) and torch.equal(ga_b, gb_b)

    conv64 = _conv(c, k, s, same, seed=n * 100 + c).double()
    x64 = x.double().requires_grad_(True)
    (exact,) = torch.autograd.grad(conv64(x64), (conv64.weight,), g.double())
    abs64 = _conv(c, k, s, same, seed=0).double()
    (magnitude,) = torch.autograd.grad(abs64(x.double().abs()), (abs64.weight,), g.double().abs())
    terms = n * g.shape[-2] * g.shape[-1] + 1
    bound = terms * U32 / (1 - terms * U32) * magnitude
    assert bool(((gb_w.double() - exact).abs() <= bound).all()), float(((gb_w.double() - exact).abs() / bound).max())
    assert bool(((ga_w.double() - exact).abs() <= bound).all())  # torch's own meets the same bound


def test_the_batched_gradient_is_used_where_torch_is_slow():
    """Kernels above 3×3 or maps smaller than the kernel, and padded maps ≤ MAX_WASTE × the kernel's taps."""
    def used(h: int, k: int) -> bool:
        return _worth_it(torch.empty(1, 1, h, h), (k, k), (k // 2, k // 2))

    assert used(2, 5) and used(4, 5) and used(8, 5) and used(2, 3)
    assert not used(4, 3) and not used(16, 3) and not used(32, 5)


def test_the_swap_keeps_the_students_parameters_outputs_and_names():
    cfg = DistillConfig(student="tf_efficientnet_lite0", weights="packaged", image_size=64)
    plain, fast = build_student(cfg, 0), build_student(cfg, 0)
    params = {name: p for name, p in fast.named_parameters()}
    assert use_fast_depthwise_grad(fast) == 16  # Lite0's depthwise convolutions
    assert {name: p for name, p in fast.named_parameters()} == params  # the same tensors under the same names
    assert list(fast.state_dict()) == list(plain.state_dict())
    pointwise = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert pointwise and all(m.groups == 1 for m in pointwise)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), fast.eval()(x))


def test_convolutions_that_are_not_plain_depthwise_are_left_alone():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # depth multiplier 2
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # grouped
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16),  # dilated
        nn.Conv2d(16, 16, 3, padding="same", groups=16),  # string padding
        nn.Conv2d(16, 16, 3, padding=1, groups=16, padding_mode="reflect"),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # the one plain depthwise convolution
    )
    assert use_fast_depthwise_grad(model) == 1
    assert isinstance(model[5], DepthwiseConv2d) and all(type(m) is nn.Conv2d for m in list(model)[:5])


def test_a_cpu_training_run_uses_it_and_follows_torchs_trajectory(tmp_path, monkeypatch, caplog):
    """train_student swaps the student's depthwise convolutions on the CPU; the run stays within what
    rounding-level gradient differences can do to Adam (`adam_divergence_bound`) of one without the swap."""
    with caplog.at_level(logging.DEBUG, logger="alignet_core.models.depthwise"):
        fast, plain, worst, bound = run_pair(tmp_path, monkeypatch, "use_fast_depthwise_grad")
    assert "16 convolutions use the batched weight gradient" in caplog.text
    assert worst <= bound, (worst, bound)
    assert fast["loss_curve"][0] == plain["loss_curve"][0]  # the first forward: the same bits

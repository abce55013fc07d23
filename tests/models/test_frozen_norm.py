"""The frozen-statistics BatchNorm backward (`alignet_core.models.frozen_norm`): in eval mode the same function as
timm's layer and the same gradients, each within float32 rounding of the exact value (as torch's own are); in
training mode timm's own path; swapped into a student without changing its parameters."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.layers.norm_act import BatchNormAct2d

from alignet_core.config.distill import DistillConfig
from alignet_core.models.frozen_norm import FrozenBatchNormAct2d, use_fast_frozen_norm
from alignet_core.models.student import build_student
from tests.models._swap_runs import run_pair
from tests.numerics import U32

# (batch, channels, height, width): the demo student's last maps (2×2) and larger ones
CASES = [(6, 24, 2, 2), (5, 16, 8, 8), (3, 8, 1, 1), (46, 40, 2, 2)]


def _gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def _layer(c: int, seed: int, act: bool = True) -> BatchNormAct2d:
    torch.manual_seed(seed)
    bn = BatchNormAct2d(c, act_layer=torch.nn.ReLU6 if act else None)
    with torch.no_grad():  # statistics and affine parameters away from the identity; means several stds off zero
        bn.running_mean.normal_(0.0, 3.0)
        bn.running_var.uniform_(0.05, 4.0)
        bn.weight.normal_(1.0, 0.5)
        bn.bias.normal_(0.0, 1.0)
    return bn.eval()


def _fast_copy(bn: BatchNormAct2d) -> BatchNormAct2d:
    fast = _layer(bn.num_features, 0, act=not isinstance(bn.act, torch.nn.Identity))
    fast.load_state_dict(bn.state_dict())
    use_fast_frozen_norm(fast)
    return fast.eval()


@pytest.mark.numerics
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n,c,h,w", CASES)
def test_outputs_and_gradients_are_the_exact_values_within_float32_rounding(n, c, h, w, channels_last):
    """Against the float64 evaluation of y = (x − μ)·γ/√(σ² + ε) + b and its gradients. First-order bounds
    (u = 2⁻²⁴, γ_k = k·u/(1 − k·u)): α = γ/√(σ² + ε) carries ≤ 4u relative error (sum, root, division,
    product), β = b − μ·α adds ≤ 6u(|b| + |μα|), and y = x·α + β two roundings, so |Δy| ≤ γ₈·(|xα| + |μα| + |b|);
    ∂L/∂x = g·α within γ₅·|gα|; ∂L/∂γ = Σ g·(x − μ)/√(σ² + ε) over K = n·h·w terms within
    γ_{K+5}·Σ|g|(|x| + |μ|)/√(σ² + ε); ∂L/∂b = Σ g within γ_K·Σ|g|. torch's own layer meets the same bounds."""
    bn = _layer(c, seed=n * 100 + c, act=False)
    fast = _fast_copy(bn)
    gen = torch.Generator().manual_seed(h * 10 + c)
    x = bn.running_mean[None, :, None, None] + torch.randn(n, c, h, w, generator=gen) * 2.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, c, h, w, generator=gen)

    x64, g64 = x.double(), g.double()
    mu, var = bn.running_mean.double(), bn.running_var.double()
    wt, b = bn.weight.detach().double(), bn.bias.detach().double()
    invstd = 1.0 / torch.sqrt(var + bn.eps)
    alpha = wt * invstd
    exact_y = (x64 - mu[:, None, None]) * alpha[:, None, None] + b[:, None, None]
    exact_gx = g64 * alpha[:, None, None]
    exact_gw = (g64 * (x64 - mu[:, None, None])).sum((0, 2, 3)) * invstd
    exact_gb = g64.sum((0, 2, 3))
    k = n * h * w
    bounds = {
        "y": _gamma(8) * ((x64 * alpha[:, None, None]).abs() + (mu * alpha).abs()[:, None, None] + b.abs()[:, None, None]),
        "gx": _gamma(5) * exact_gx.abs(),
        "gw": _gamma(k + 5) * (g64.abs() * (x64.abs() + mu.abs()[:, None, None])).sum((0, 2, 3)) * invstd,
        "gb": _gamma(k) * g64.abs().sum((0, 2, 3)),
    }
    for layer in (bn, fast):
        xin = x.clone().requires_grad_(True)
        y = layer(xin)
        gx, gw, gb = torch.autograd.grad(y, (xin, layer.weight, layer.bias), g)
        for name, got, exact in (("y", y, exact_y), ("gx", gx, exact_gx), ("gw", gw, exact_gw), ("gb", gb, exact_gb)):
            err = (got.double() - exact).abs()
            assert bool((err <= bounds[name]).all()), (type(layer).__name__, name, float((err / bounds[name]).max()))


def test_in_training_mode_it_is_timms_layer_bit_for_bit_statistics_included():
    bn = _layer(12, seed=1).train()
    fast = _fast_copy(bn).train()
    x = torch.randn(8, 12, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ya, yb = bn(x), fast(x)
    assert torch.equal(ya, yb)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(torch.autograd.grad(ya, (x, bn.weight), g),
                                                  torch.autograd.grad(yb, (x, fast.weight), g)))
    assert torch.equal(bn.running_mean, fast.running_mean) and torch.equal(bn.running_var, fast.running_var)


def test_the_swap_keeps_the_students_parameters_buffers_and_names():
    cfg = DistillConfig(student="tf_efficientnet_lite0", weights="packaged", image_size=64)
    plain, fast = build_student(cfg, 0), build_student(cfg, 0)
    params = dict(fast.named_parameters())
    buffers = dict(fast.named_buffers())
    assert use_fast_frozen_norm(fast) == 49  # Lite0's BatchNorm layers
    assert dict(fast.named_parameters()) == params and dict(fast.named_buffers()) == buffers
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in fast.modules()) == 49
    assert use_fast_frozen_norm(fast) == 0  # swapped once


def test_a_cpu_training_run_of_the_last_blocks_uses_it_and_follows_torchs_trajectory(tmp_path, monkeypatch, caplog):
    """train_student swaps the student's BatchNorm layers on the CPU; with `train_blocks` (frozen statistics) the
    run stays within what rounding-level gradient differences can do to Adam (`adam_divergence_bound`) of one
    without the swap."""
    with caplog.at_level(logging.DEBUG, logger="alignet_core.models.frozen_norm"):
        _, _, worst, bound = run_pair(tmp_path, monkeypatch, "use_fast_frozen_norm", train_blocks=4)
    assert "49 BatchNorm layers" in caplog.text
    assert worst <= bound, (worst, bound)
    assert worst > 0  # the swap was in the run

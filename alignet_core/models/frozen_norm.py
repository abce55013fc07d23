"""A faster CPU backward for the BatchNorm layers of a student whose statistics are frozen (eval mode).

With `distill.train_blocks` the student's backbone runs in eval mode: each BatchNorm is a fixed per-channel
affine map of its input, y = x·α + β with α = γ/√(σ² + ε) and β = b − μ·α, whose weight γ and bias b still
train. torch's CPU backward of such a layer (`native_batch_norm_backward`) is slow on the small maps of a 64-px
student (46 images × 1,152 channels × 2×2). Here the backward is three plain tensor expressions (a step of the
demo's last 4 blocks 0.071 → 0.064 s, `benchmarks.partial_student`):

    ∂L/∂x = g·α,   ∂L/∂γ = Σ g·(x − μ) / √(σ² + ε),   ∂L/∂b = Σ g        (sums over images and positions)

the same functions as torch's in another order of summation (their last bits differ). Layers in training mode
(batch statistics) keep torch's own path.
"""

from __future__ import annotations

import logging

import torch
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

log = logging.getLogger(__name__)


class _FrozenBatchNorm(torch.autograd.Function):
    """y = x·α + β per channel from fixed statistics; gradients for x, the weight and the bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):  # type: ignore[no-untyped-def, override]
        invstd = 1.0 / torch.sqrt(var + eps)
        alpha = weight * invstd
        beta = bias - mean * alpha
        ctx.save_for_backward(x, mean, invstd, alpha)
        return torch.addcmul(beta[:, None, None], x, alpha[:, None, None])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        x, mean, invstd, alpha = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gx = grad_out * alpha[:, None, None] if want_x else None
        gw = (grad_out * (x - mean[:, None, None])).sum((0, 2, 3)) * invstd if want_w else None
        gb = grad_out.sum((0, 2, 3)) if want_b else None
        return gx, gw, gb, None, None, None


class FrozenBatchNormAct2d(BatchNormAct2d):
    """timm's `BatchNormAct2d` (same parameters, buffers, children and state-dict names) whose eval-mode forward
    differentiates through `_FrozenBatchNorm`; in training mode, or without running statistics or affine
    parameters, it is timm's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = (not self.training and self.running_mean is not None and self.running_var is not None
                  and self.weight is not None and self.bias is not None and x.ndim == 4)
        if not frozen:
            return super().forward(x)
        x = _FrozenBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)
        return self.act(self.drop(x))


def use_fast_frozen_norm(model: nn.Module) -> int:
    """Give every timm `BatchNormAct2d` of `model` (exactly that class) `FrozenBatchNormAct2d`'s forward, in
    place: the module objects stay (their class becomes the subclass, which adds no state), so the parameters,
    buffers, names and the optimizer's tensors are unchanged. Returns how many."""
    layers = [m for m in model.modules() if type(m) is BatchNormAct2d]
    for m in layers:
        m.__class__ = FrozenBatchNormAct2d
    log.debug("frozen norm: %d BatchNorm layers use the plain backward in eval mode", len(layers))
    return len(layers)

"""A faster CPU weight gradient for the depthwise convolutions of a student being trained.

torch's CPU convolution (oneDNN) computes a depthwise kernel's weight gradient slowly where the feature map is
small beside the kernel: EfficientNet-Lite0 at 64 px has 5×5 kernels over 2×2 to 8×8 maps, and each of their
weight gradients took 13–23 ms for 46 images (tens of times its forward), most of a training step on 2 cores
(`benchmarks/results/depthwise_grad.json`). Here that gradient is one batched matrix product over the channels
and a gather:

    M[c] = Σ_n g[n, c]ᵀ x̃[n, c]      (output positions × padded input positions)
    ∂L/∂w[c, t] = Σ_o M[c, o, q(o, t)],  q(o, t) = the padded input position under kernel tap t at output o

(x̃ the zero-padded input). The forward pass and the input gradient stay torch's own, so the student's outputs
are unchanged; the weight gradient is the same sum in another order (its last bits differ). Where the padded
map is large beside the kernel (more than `MAX_WASTE` times its taps) the product would do more work than
oneDNN, and torch's gradient is used; so it is where oneDNN is fast (3×3 kernels over maps at least as large).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

log = logging.getLogger(__name__)

#: the matrix product reads every padded input position for every output, where the gradient needs only the
#: kernel's taps: it is used while padded positions ≤ MAX_WASTE × taps (measured on 2 cores: 2× faster than
#: oneDNN at 19×19 padded under a 5×5 kernel, 10× at 7×7; `benchmarks.depthwise_grad`)
MAX_WASTE = 16


@functools.lru_cache(maxsize=64)
def _tap_index(ho: int, wo: int, hp: int, wp: int, kh: int, kw: int, sh: int, sw: int) -> torch.Tensor:
    """(ho·wo·kh·kw,) flat indices into M (ho·wo, hp·wp): output o's row, the padded input position under
    tap (i, j) in its column; ordered output-major, then taps row-major."""
    oy = torch.arange(ho).repeat_interleave(wo)  # (lo,)
    ox = torch.arange(wo).repeat(ho)
    ty = torch.arange(kh).repeat_interleave(kw)  # (kh·kw,)
    tx = torch.arange(kw).repeat(kh)
    q = (oy[:, None] * sh + ty[None, :]) * wp + (ox[:, None] * sw + tx[None, :])  # (lo, taps)
    o = torch.arange(ho * wo)[:, None]
    return (o * (hp * wp) + q).reshape(-1)


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, int],
                          stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """∂L/∂w (C, 1, kh, kw) of a depthwise convolution (groups = C, dilation 1, zero padding) from its input
    x (N, C, H, W) and the gradient of its output grad_out (N, C, Ho, Wo), by `M[c] = g[c]ᵀ x̃[c]` and a gather."""
    n, c, _, _ = x.shape
    kh, kw = kernel
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    hp, wp = xp.shape[-2:]
    ho, wo = grad_out.shape[-2:]
    g = grad_out.reshape(n, c, ho * wo).permute(1, 2, 0)  # (C, lo, N)
    xs = xp.reshape(n, c, hp * wp).permute(1, 0, 2)  # (C, N, lp)
    m = torch.bmm(g, xs)  # (C, lo, lp)
    idx = _tap_index(ho, wo, hp, wp, kh, kw, stride[0], stride[1]).to(m.device)
    return m.reshape(c, -1)[:, idx].reshape(c, ho * wo, kh * kw).sum(1).reshape(c, 1, kh, kw)


def _worth_it(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Where oneDNN's weight gradient is slow (measured: kernels above 3×3, or maps smaller than the kernel) and
    the product's extra work is bounded (padded positions ≤ MAX_WASTE × the kernel's taps)."""
    h, w = x.shape[-2:]
    slow_in_torch = kernel[0] > 3 or kernel[1] > 3 or h < kernel[0] or w < kernel[1]
    return slow_in_torch and (h + 2 * padding[0]) * (w + 2 * padding[1]) <= MAX_WASTE * kernel[0] * kernel[1]


class _DepthwiseConv(torch.autograd.Function):
    """F.conv2d with groups = C whose weight gradient is `depthwise_weight_grad` where that is worth it."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        x, weight = ctx.saved_tensors
        kernel = tuple(weight.shape[-2:])
        fast = _worth_it(x, kernel, ctx.padding)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], x.shape[1],
            [want_x, want_w and not fast, want_b and ctx.has_bias],
        )
        if want_w and fast:
            gw = depthwise_weight_grad(x, grad_out, kernel, ctx.stride, ctx.padding)
        return gx, gw, gb if ctx.has_bias else None, None, None


class DepthwiseConv2d(nn.Module):
    """A depthwise `nn.Conv2d` (or timm's TF-'SAME' `Conv2dSame`) computing the same outputs with the same
    parameters (the same Parameter objects, under the same state-dict names), trained with the faster
    weight gradient."""

    def __init__(self, conv: nn.Conv2d, same: bool) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = (0, 0) if same else tuple(conv.padding)  # type: ignore[arg-type]
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = pad_same(x, list(self.kernel_size), list(self.stride))
        return _DepthwiseConv.apply(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, same={self.same}"


def _replaceable(module: nn.Module) -> bool | None:
    """None unless `module` is a plain depthwise 2-d convolution; else whether it pads TF-'SAME'."""
    if type(module) not in (nn.Conv2d, Conv2dSame):
        return None
    conv: nn.Conv2d = module  # type: ignore[assignment]
    plain = (conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
             and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
             and not isinstance(conv.padding, str))
    return (type(module) is Conv2dSame) if plain else None


def use_fast_depthwise_grad(model: nn.Module) -> int:
    """Swap every plain depthwise convolution of `model` for a `DepthwiseConv2d` sharing its parameters (in
    place: the state dict's names and the optimizer's tensors are unchanged). Returns how many were swapped."""
    swaps = []
    for module in model.modules():
        for child_name, child in module.named_children():
            same = _replaceable(child)
            if same is not None:
                swaps.append((module, child_name, child, same))
    for parent, child_name, child, same in swaps:
        setattr(parent, child_name, DepthwiseConv2d(child, same))
    log.debug("depthwise: %d convolutions use the batched weight gradient", len(swaps))
    return len(swaps)

"""The harmonizer's maths (alignet_core/distill/harmonizer.py) against hand-computed arrays, against
the reference formulas (harmonization 0.0.9, written out here in numpy loops), and its gradient
(double backward through the input gradient) by `torch.autograd.gradcheck` in float64."""

import numpy as np
import pytest
import torch
from torch import nn

from alignet_core.distill import harmonizer as H
from alignet_core.errors import InputError


def _tf_same_conv_stride2(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """tf.nn.conv2d(x, k, strides=2, padding='SAME') of one (H, W) map, by loops."""
    h, w = x.shape
    kh = k.shape[0]
    oh, ow = -(-h // 2), -(-w // 2)
    pad_h = max((oh - 1) * 2 + kh - h, 0) // 2
    pad_w = max((ow - 1) * 2 + kh - w, 0) // 2
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            s = 0.0
            for a in range(kh):
                for b in range(kh):
                    y, z = 2 * i - pad_h + a, 2 * j - pad_w + b
                    if 0 <= y < h and 0 <= z < w:
                        s += k[a, b] * x[y, z]
            out[i, j] = s
    return out


def _ref_kernel() -> np.ndarray:
    k = np.array((1.0, 4.0, 6.0, 4.0, 1.0))
    k = np.outer(k, k)
    return k / k.sum()


def _ref_standardize_cut(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return np.maximum((x - x.mean()) / (x.std() + eps), 0.0)


def test_binomial_kernel_by_hand():
    k = H.binomial_kernel(torch.float64)
    assert k.shape == (5, 5)
    assert k[2, 2].item() == pytest.approx(36 / 256)
    assert k[0, 0].item() == pytest.approx(1 / 256)
    assert k[0, 2].item() == pytest.approx(6 / 256)
    assert k.sum().item() == pytest.approx(1.0)


def test_downsample_by_hand():
    # a delta at (1, 1) of a 4×4 map: 'SAME' pads 1 before and 2 after, so output (0, 0) sees the delta
    # at the kernel's centre, (0, 1) and (1, 0) at an edge-centre tap, (1, 1) at a corner tap
    x = torch.zeros(1, 4, 4, dtype=torch.float64)
    x[0, 1, 1] = 1.0
    got = H.downsample(x)[0]
    assert torch.allclose(got, torch.tensor([[36.0, 6.0], [6.0, 1.0]], dtype=torch.float64) / 256)
    # ones: the zero padding cuts 1/16 of the kernel's weight at the top/left, 5/16 at the bottom/right
    ones = H.downsample(torch.ones(1, 4, 4, dtype=torch.float64))[0]
    assert torch.allclose(ones, torch.tensor([[225.0, 165.0], [165.0, 121.0]], dtype=torch.float64) / 256)


def test_standardize_cut_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    # mean 2.5, population std √1.25
    want = torch.tensor([[[0.0, 0.0], [0.5 / (1.25**0.5 + 1e-5), 1.5 / (1.25**0.5 + 1e-5)]]], dtype=torch.float64)
    assert torch.allclose(H.standardize_cut(x), want)
    assert torch.equal(H.standardize_cut(torch.full((1, 3, 3), 7.0)), torch.zeros(1, 3, 3))


@pytest.mark.parametrize("shape", [(16, 16), (13, 9), (7, 12)])
def test_pyramid_matches_reference_formula(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    levels = H.pyramid(torch.from_numpy(x)[None], 4)
    ref = [x]
    for _ in range(3):
        ref.append(_tf_same_conv_stride2(ref[-1], _ref_kernel()))
    assert [tuple(lv.shape[-2:]) for lv in levels] == [r.shape for r in ref]
    for lv, r in zip(levels, ref):
        np.testing.assert_allclose(lv[0].numpy(), r, rtol=1e-12, atol=1e-12)


def test_harmonization_term_matches_reference_formula():
    rng = np.random.default_rng(1)
    sal, human = rng.normal(size=(3, 16, 16)), rng.random(size=(3, 16, 16))
    tokens = np.array([1.0, 0.0, 1.0])
    got = H.harmonization_term(torch.from_numpy(sal), torch.from_numpy(human), torch.from_numpy(tokens), levels=5)
    s = np.stack([_ref_standardize_cut(m) for m in sal])
    h = np.stack([_ref_standardize_cut(m) for m in human])
    h = h / (h.max(axis=(1, 2), keepdims=True) + 1e-6) * (s.max(axis=(1, 2), keepdims=True) + 1e-6)
    per_level = []
    ps, ph = list(s), list(h)
    for level in range(5):
        per_level.append(np.mean([(a - b) ** 2 * t for a, b, t in zip(ps, ph, tokens)]))
        ps = [_tf_same_conv_stride2(a, _ref_kernel()) for a in ps]
        ph = [_tf_same_conv_stride2(b, _ref_kernel()) for b in ph]
    assert got.item() == pytest.approx(float(np.mean(per_level)), rel=1e-10)


def test_harmonization_term_zero_when_maps_agree_or_no_token():
    m = torch.rand(2, 8, 8, dtype=torch.float64)
    assert H.harmonization_term(m, m, torch.ones(2), 3).item() == pytest.approx(0.0, abs=1e-12)
    other = torch.rand(2, 8, 8, dtype=torch.float64)
    assert H.harmonization_term(m, other, torch.zeros(2), 3).item() == 0.0
    assert H.harmonization_term(m, other, torch.ones(2), 3).item() > 0.0
    with pytest.raises(InputError, match="shape"):
        H.harmonization_term(m, other[:, :4], torch.ones(2), 3)
    with pytest.raises(InputError, match="levels"):
        H.pyramid(m, 0)


def test_saliency_of_a_linear_model_is_its_weights():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    labels = torch.tensor([3, 1])
    sal, logits = H.saliency(lin, x, labels)
    w = lin[1].weight.detach().reshape(5, 3, 4, 4)
    assert torch.allclose(sal, w[labels].mean(dim=1))
    assert logits.shape == (2, 5)


class _Tiny(nn.Module):
    """A tiny smooth classifier: conv → tanh → BatchNorm (eval) → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.tanh(self.conv(x))).flatten(1))


def test_l2_penalty_leaves_out_norms():
    m = _Tiny()
    want = 0.5 * sum((p**2).sum() for n, p in m.named_parameters() if not n.startswith("bn."))
    assert H.l2_penalty(m).item() == pytest.approx(want.item())


def test_harmonizer_loss_gradcheck_float64():
    """gradcheck of the full loss (CE + L2 + harmonization term) in the weights, through the double
    backward. The reference stops the gradient through the saliency maps' maximum (it rescales the
    human maps), so its value moves with the weights while its gradient does not: gradcheck holds
    that maximum at its value at the checked point, where the two agree."""
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    human = torch.rand(2, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    tokens = torch.tensor([1.0, 1.0], dtype=torch.float64)
    sal0, _ = H.saliency(model, images, labels, create_graph=False)
    s_max = H.standardize_cut(sal0).amax(dim=(-2, -1), keepdim=True) + 1e-6

    def loss(*ps: torch.Tensor, s_max: torch.Tensor | None = s_max) -> torch.Tensor:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

        sal, logits = H.saliency(forward, images, labels, create_graph=True)
        ce = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=H.LABEL_SMOOTHING)
        l2 = sum(0.5 * (p**2).sum() for n, p in zip(names, ps) if not n.startswith("bn."))
        return ce + H.L2_WEIGHT * l2 + H.harmonization_term(sal, human, tokens, 3, saliency_max=s_max)

    # at the checked point: the same number as harmonizer_loss on the module, and the same gradient
    ref = H.harmonizer_loss(model, images, tokens, labels, human, 3)
    assert loss(*params).item() == pytest.approx(ref.item(), rel=1e-12)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    g_fix = torch.autograd.grad(loss(*params), params)
    for a, b in zip(g_ref, g_fix):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    # the harmonization term reaches the weights only through the double backward: its gradient is not zero
    sal, _ = H.saliency(model, images, labels, create_graph=True)
    g = torch.autograd.grad(H.harmonization_term(sal, human, tokens, 3), model.conv.weight)[0]
    assert g.abs().sum() > 0

"""The neural harmonizer (Fel et al., NeurIPS 2022, seed 003): align *where* a model looks with
where humans find an object's diagnostic features, in PyTorch.

The maths follows the MIT reference package `harmonization` 0.0.9 (`training/loss.py`,
`training/pyramid.py`), written here without TensorFlow:

- `saliency`: the input gradient of the label's logit, averaged over the colour channels
  (`create_graph=True`, so a loss on it back-propagates to the weights: a double backward).
- `standardize_cut`: per map, (x − mean) / (std + 1e-5) (population std), then ReLU.
- `harmonization_term`: both maps standardize-cut, the human map rescaled to the saliency map's
  maximum (that maximum taken without gradient, as the reference's `stop_gradient`), then
  `pyramidal_mse`: the token-weighted MSE averaged over `levels` levels of a Gaussian pyramid
  (level 0 the map itself, each next one the previous blurred by the binomial (1 4 6 4 1)⊗(1 4 6 4
  1)/256 kernel with TensorFlow's 'SAME' zero padding and stride 2). The reference builds
  levels+1 maps and uses the first `levels`; the same here.
- `harmonizer_loss`: the reference's full objective, cross-entropy with label smoothing 0.1
  + 1e-5 · Σ ½‖w‖² over weights outside normalisation layers and embeddings + λ · harmonization
  term (λ = 1). The distill stage uses only the harmonization term beside the AligNet loss
  (`distill.harmonize`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignet_core.config.distill import DistillConfig
from alignet_core.errors import InputError
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.importance_maps import PROXY_NAME, source_maps
from alignet_core.io.sources import ImageSource
from alignet_core.models import factory as models

log = logging.getLogger(__name__)

BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
LABEL_SMOOTHING = 0.1
L2_WEIGHT = 1e-5
# name parts of parameters left out of the L2 term (the reference's 'norm', 'Norm', 'embed', 'class_token')
L2_EXCLUDED = ("norm", "embed", "token")
_NORMS_AND_EMBEDDINGS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def binomial_kernel(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (5, 5) binomial kernel (1 4 6 4 1)ᵀ(1 4 6 4 1) / 256."""
    k = torch.tensor(BINOMIAL, dtype=dtype)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding (before, after) of one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def downsample(maps: torch.Tensor) -> torch.Tensor:
    """One pyramid step: maps (b, H, W) → (b, ⌈H/2⌉, ⌈W/2⌉), binomial blur with 'SAME' zero
    padding and stride 2 (the reference's `tf.nn.conv2d(..., strides=2, padding='SAME')`)."""
    h, w = maps.shape[-2:]
    top, bottom = _same_padding(h, 5, 2)
    left, right = _same_padding(w, 5, 2)
    x = F.pad(maps[:, None], (left, right, top, bottom))
    return F.conv2d(x, binomial_kernel(maps.dtype).to(maps.device)[None, None], stride=2)[:, 0]


def pyramid(maps: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The first `levels` maps of the Gaussian pyramid of maps (b, H, W): [maps, ↓maps, ↓↓maps, …]."""
    if maps.ndim != 3:
        raise InputError(f"pyramid: expected maps of shape (b, H, W), got {tuple(maps.shape)}")
    if levels < 1:
        raise InputError(f"distill.harmonize.levels: expected at least 1 level, got {levels}")
    out = [maps]
    for _ in range(levels - 1):
        out.append(downsample(out[-1]))
    return out


def standardize_cut(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per map (b, H, W): ReLU((x − mean) / (std + eps)), std the population standard deviation."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True, correction=0)
    return F.relu((maps - mean) / (std + eps))


def pyramidal_mse(a: torch.Tensor, b: torch.Tensor, tokens: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Mean over `levels` pyramid levels of mean((a − b)² · token) (per image token, (b,)).

    a, b: (b, H, W) maps. As the reference, each level's mean runs over every image of the batch,
    those with token 0 included (they add 0), so the term scales with the share of mapped images."""
    if a.shape != b.shape:
        raise InputError(f"pyramidal_mse: maps of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    pa, pb = pyramid(a, levels), pyramid(b, levels)
    t = tokens.to(a.dtype)[:, None, None]
    return torch.stack([((x - y) ** 2 * t).mean() for x, y in zip(pa, pb)]).mean()


def saliency(logits_of: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The training saliency: ∂ logit[label] / ∂ image, averaged over channels.

    logits_of: images (b, 3, H, W) → logits (b, classes); labels: (b,) long. Returns
    (saliency (b, H, W), logits (b, classes)); with create_graph the saliency is differentiable
    in the weights (double backward). `images` need not require grad (a leaf copy is used)."""
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    logits = logits_of(x)
    picked = logits.gather(1, labels.long()[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return grad.mean(dim=1), logits


def harmonization_term(sal: torch.Tensor, human: torch.Tensor, tokens: torch.Tensor, levels: int = 5,
                       saliency_max: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's pyramidal term between a saliency map and a human map, both (b, H, W).

    Both standardize-cut; the human map divided by its max and multiplied by the saliency map's
    max (no gradient through that max, the reference's stop_gradient; `saliency_max` (b, 1, 1)
    gives it instead, e.g. to hold it fixed in a gradient check); `pyramidal_mse` weighted by
    tokens (b,) (1: the image has a human map)."""
    if sal.shape != human.shape:
        raise InputError(f"harmonizer: saliency {tuple(sal.shape)} and human maps {tuple(human.shape)} differ in shape")
    s = standardize_cut(sal)
    h = standardize_cut(human.to(sal.dtype))
    h_max = h.amax(dim=(-2, -1), keepdim=True) + 1e-6
    s_max = s.detach().amax(dim=(-2, -1), keepdim=True) + 1e-6 if saliency_max is None else saliency_max
    return pyramidal_mse(s, h / h_max * s_max, tokens, levels)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Σ ½‖w‖² (tf.nn.l2_loss) over trainable parameters outside normalisation layers and
    embeddings: those of BatchNorm/LayerNorm/GroupNorm/Embedding modules and those whose names
    hold 'norm', 'embed' or 'token' are left out, as the reference does by name."""
    skip = {id(p) for m in model.modules() if isinstance(m, _NORMS_AND_EMBEDDINGS) for p in m.parameters()}
    terms = [0.5 * (p**2).sum() for name, p in model.named_parameters()
             if p.requires_grad and id(p) not in skip and not any(part in name.lower() for part in L2_EXCLUDED)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def harmonizer_loss(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    human: torch.Tensor,
    levels: int = 5,
    lambda_weights: float = L2_WEIGHT,
    lambda_harmonization: float = 1.0,
) -> torch.Tensor:
    """The reference's harmonizer loss of a classifier `model` on one batch (a scalar).

    images (b, 3, H, W); tokens (b,) (1 where the image has a human map); labels (b,) long class
    indices; human (b, H, W) maps. CE(label smoothing 0.1) + lambda_weights · `l2_penalty` +
    lambda_harmonization · `harmonization_term` of the label's saliency."""
    sal, logits = saliency(model, images, labels, create_graph=True)
    ce = F.cross_entropy(logits, labels.long(), label_smoothing=LABEL_SMOOTHING)
    return ce + lambda_weights * l2_penalty(model).to(ce) + lambda_harmonization * harmonization_term(
        sal, human, tokens, levels)


class StudentHarmonizer:
    """The harmonizer's term for the triplet student during distillation (`distill.harmonize`).

    Holds the importance maps of the training images (maps (m, H, W) float32 on the student's input
    pixels, tokens (m,), for the sorted source rows `rows` (m,)). `forward` runs the student once,
    returning its head outputs for the AligNet loss and the pyramidal saliency term: the saliency
    of the backbone classifier's own top-1 logit (labels 'top1': triplet data carry no class of
    the backbone's classifier), averaged over channels, against the images' maps."""

    def __init__(self, maps: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | list[int], levels: int) -> None:
        self.rows = torch.as_tensor(rows, dtype=torch.int64)
        if maps.ndim != 3 or len(maps) != len(self.rows) or tokens.shape != (len(self.rows),):
            raise InputError(f"harmonizer: {len(self.rows)} rows need maps (m, H, W) and tokens (m,), got "
                             f"{tuple(maps.shape)} and {tuple(tokens.shape)}")
        self.maps, self.tokens, self.levels = maps.float(), tokens.float(), int(levels)

    def forward(self, student: nn.Module, images: torch.Tensor, pool_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (u, 3, H, W) of source rows pool_rows (u,) → (head outputs (u, head_dim), term ())."""
        slot = torch.searchsorted(self.rows, pool_rows.cpu().long())
        if (slot >= len(self.rows)).any() or (self.rows[slot.clamp(max=len(self.rows) - 1)] != pool_rows.cpu()).any():
            raise InputError("harmonizer: a batch image has no entry among the training images' maps")
        backbone = student.backbone
        x = images.detach().requires_grad_(True)
        pooled = models.pooled_features(backbone, x)  # (u, p)
        logits = backbone.get_classifier()(pooled)  # (u, classes)
        labels = logits.detach().argmax(1)
        picked = logits.gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, x, create_graph=True)
        sal = grad.float().mean(dim=1)  # (u, H, W)
        human = self.maps[slot].to(sal.device)
        if human.shape[-2:] != sal.shape[-2:]:
            raise InputError(f"harmonizer: maps of {tuple(human.shape[-2:])} pixels for images of {tuple(sal.shape[-2:])}")
        term = harmonization_term(sal, human, self.tokens[slot].to(sal.device), self.levels)
        return student.head(pooled), term


def training_harmonizer(cfg: DistillConfig, train: AlignetTriplets, source: ImageSource,
                        transform: Callable[[Any], torch.Tensor]) -> StudentHarmonizer | None:
    """The run's `StudentHarmonizer` (None when `distill.harmonize` is off): the maps of every image
    the training split uses, on the pixels `transform` gives them. Images without a map (or with a
    bad map file) get token 0 and stay out of the term; they are counted in the log."""
    h = cfg.harmonize
    if h is None:
        return None
    rows = np.unique(np.asarray(train.indices, dtype=np.int64))
    maps, tokens, report = source_maps(source, h.maps, transform, rows)
    log.info("distill.harmonize: maps of %d of %d training images (%s); skipped %s", report.read, len(rows),
             PROXY_NAME if h.maps == "proxy" else h.maps, dict(report.skipped))
    return StudentHarmonizer(maps, tokens, torch.from_numpy(rows), h.levels)

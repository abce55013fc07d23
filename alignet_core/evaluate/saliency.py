"""The "where" metric: how well a model's saliency agrees with human importance maps (Fel et al.
2022; the reference's `evaluation/metrics.py` and `evaluation/clickme.py`).

- Saliency for evaluation is the reference's default explainer (Xplique `Saliency`): the largest
  absolute input gradient of the label's logit over the colour channels, (b, H, W). (Training uses
  the signed channel mean instead, `distill.harmonizer.saliency`, as the reference does.)
- Per image: Spearman's ρ between the saliency and the human map over all pixels (ties get average
  ranks, as scipy's `spearmanr`), and IoU / Dice of the two maps' top 10% pixels (pixels strictly
  above the 90th percentile, numpy's linear percentile, as the reference).
- Over images: the mean with a bootstrap 95% interval (`evaluate.bootstrap.mean_interval`); a
  before/after change is the mean of the per-image differences with its paired interval. An image
  whose either map is constant has no ρ and is left out of the mean (counted in `n`).

The label of each image is the data's when given, else the model's own top-1 class
(`label_rule` says which).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import rankdata

from alignet_core.errors import InputError
from alignet_core.evaluate.saliency_scores import (
    SaliencyAlignment,
    SaliencyScores,
    saliency_alignment,
    summarize,
)
from alignet_core.io.importance_maps import source_maps
from alignet_core.io.sources import ImageSource
from alignet_core.models.embedding import decode_images
from alignet_core.models.student import TripletStudent, eval_transform
from alignet_core.plots import saliency_grid_png

TOP_PERCENT = 10
EPSILON = 1e-9
__all__ = ["SaliencyAlignment", "SaliencyScores", "saliency_alignment", "summarize"]  # re-exported


def explain(logits_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            labels: torch.Tensor | None = None, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation saliency: max over channels of |∂ logit[label] / ∂ image|.

    images (n, 3, H, W) float; labels (n,) long, or None for the model's own top-1 class.
    Returns (saliency (n, H, W) float32 on the CPU, the labels used (n,) long)."""
    maps, used = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].detach().clone().requires_grad_(True)
        logits = logits_of(x)
        y = logits.detach().argmax(1) if labels is None else labels[i:i + batch_size].to(logits.device).long()
        (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
        maps.append(g.abs().amax(dim=1).float().cpu())
        used.append(y.cpu())
    return torch.cat(maps), torch.cat(used)


def _flat(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"saliency metrics: expected two (n, H, W) sets of maps of one shape, got {a.shape} and {b.shape}")
    return a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)


def spearman_per_image(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Spearman's ρ of each pair of maps a[i], b[i] (n, H, W) over pixels → (n,) float64 (NaN where a map is constant)."""
    x, y = _flat(a, b)
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _top(x: np.ndarray, percent: float) -> np.ndarray:
    return x > np.percentile(x, 100 - percent, axis=1, keepdims=True)


def iou_top(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, percent: float = TOP_PERCENT) -> np.ndarray:
    """IoU of the pixels above each map's (100 − percent)th percentile → (n,)."""
    x, y = _flat(a, b)
    ta, tb = _top(x, percent), _top(y, percent)
    return (ta & tb).sum(1) / ((ta | tb).sum(1) + EPSILON)


def dice_top(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, percent: float = TOP_PERCENT) -> np.ndarray:
    """Sørensen–Dice of the pixels above each map's (100 − percent)th percentile → (n,)."""
    x, y = _flat(a, b)
    ta, tb = _top(x, percent), _top(y, percent)
    return 2.0 * (ta & tb).sum(1) / (ta.sum(1) + tb.sum(1) + EPSILON)


def per_image_scores(sal: torch.Tensor, human: torch.Tensor) -> dict[str, np.ndarray]:
    """{'spearman', 'iou_top10', 'dice_top10'}: (n,) per-image scores of saliency vs human maps (n, H, W)."""
    return {"spearman": spearman_per_image(sal, human), "iou_top10": iou_top(sal, human),
            "dice_top10": dice_top(sal, human)}


def student_saliency(student: TripletStudent, source: ImageSource, rows: np.ndarray, maps: str,
                     device: torch.device, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A student's evaluation saliency on source rows that have a map, beside those maps.

    The saliency is of the backbone classifier's own top-1 logit (the source has no classes of
    that classifier), on the student's input pixels; maps as `io.importance_maps.source_maps`.
    Returns (saliency (m, H, W), maps (m, H, W), the rows (m,) long that had a map)."""
    transform = eval_transform(student.backbone, student.image_size)
    rows = np.asarray(rows, dtype=np.int64)
    human, tokens, _report = source_maps(source, maps, transform, rows)
    keep = tokens.numpy() > 0
    rows = rows[keep]
    images = decode_images([source.records[int(r)].path for r in rows], transform)
    backbone = student.backbone.eval().to(device)
    sal, _labels = explain(lambda x: backbone(x), images.to(device), None, batch_size)
    return sal, human[torch.from_numpy(keep)], torch.from_numpy(rows)


LABEL_RULE = "top-1 class of each model's own ImageNet classifier"


def where_metric(raw: TripletStudent, tuned: TripletStudent, source: ImageSource, rows: np.ndarray, maps: str,
                 device: torch.device, seed: int, maps_name: str, n_pictures: int = 4
                 ) -> tuple[SaliencyAlignment, bytes | None]:
    """The "where" metric of the pretrained (`raw`) and finetuned (`tuned`) student on source rows
    (those with a map), and a PNG of `n_pictures` images side by side (image, map, saliency before,
    after; None when no image has a map). `maps_name` is how reports name the maps."""
    before_sal, human, kept = student_saliency(raw, source, rows, maps, device)
    after_sal, _, _ = student_saliency(tuned, source, rows, maps, device)
    result = saliency_alignment(per_image_scores(before_sal, human), per_image_scores(after_sal, human), maps_name,
                                LABEL_RULE, seed)
    picks = kept[:n_pictures]
    if not len(picks):
        return result, None
    transform = eval_transform(raw.backbone, raw.image_size)
    images = decode_images([source.records[int(r)].path for r in picks], transform)
    png = saliency_grid_png(images, human[:len(picks)], before_sal[:len(picks)], after_sal[:len(picks)])
    return result, png

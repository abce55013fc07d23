"""Small PNG charts for run reports and Prefect artifacts.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display),
and embedded in markdown as data URIs, which the Prefect UI renders in its artifact view.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

_SIZE = (6.4, 3.2)
_DPI = 100


def _figure(figsize: tuple[float, float] = _SIZE) -> Figure:
    """A new figure. matplotlib is imported here, when a chart is drawn: importing the pipeline (a cached
    rerun, the CLI) must not pay for it."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` points: (n,) → (n,) float64 (the first points average
    what they have)."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.concatenate([[0.0], x]))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_curve_png(losses: Sequence[float], title: str = "training loss") -> bytes:
    """Per-step loss (thin) and its moving average (thick) against the optimizer step."""
    fig = _figure()
    ax = fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.7, alpha=0.45, color="tab:blue", label="per step")
    window = max(1, len(losses) // 20)
    ax.plot(steps, moving_average(losses, window), lw=2.0, color="tab:blue", label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def curve_png(series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str) -> bytes:
    """One line per named series against its 1-based index (e.g. a score per epoch)."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, lw=1.5, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def before_after_png(scores: Mapping[str, tuple[float | None, float | None]], title: str, chance: float | None = None) -> bytes:
    """Grouped bars of a score before and after, one group per named measure (None: no bar)."""
    fig = _figure()
    ax = fig.add_subplot()
    names = list(scores)
    x = np.arange(len(names))
    for offset, label, pick, color in ((-0.2, "before", 0, "tab:gray"), (0.2, "after", 1, "tab:green")):
        vals = [scores[n][pick] for n in names]
        ax.bar(x[[v is not None for v in vals]] + offset, [v for v in vals if v is not None], width=0.4,
               label=label, color=color)
    if chance is not None:
        ax.axhline(chance, ls="--", lw=1, color="k", label="chance")
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylabel="accuracy", title=title, ylim=(0, 1.15))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    return _png(fig)


def sizes_png(sizes: Sequence[int], title: str = "cluster sizes") -> bytes:
    """Bars of group sizes, largest first."""
    fig = _figure()
    ax = fig.add_subplot()
    s = np.sort(np.asarray(sizes))[::-1]
    ax.bar(np.arange(len(s)), s, width=0.9, color="tab:purple")
    ax.set(xlabel="cluster (by size)", ylabel="images", title=title)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def markdown_image(png: bytes, alt: str) -> str:
    """A markdown image whose source is the PNG itself (a data URI)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def saliency_grid_png(images: torch.Tensor, human: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> bytes:
    """One row per image: the image (min-max scaled), the importance map, the saliency before and
    after finetuning. images (k, 3, H, W); human, before, after (k, H, W)."""
    k = len(images)
    fig = _figure((6.4, 1.7 * k))
    titles = ("image", "importance map", "saliency before", "saliency after")
    for i in range(k):
        img = images[i].permute(1, 2, 0).float().numpy()
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        for j, panel in enumerate((img, human[i].numpy(), before[i].numpy(), after[i].numpy())):
            ax = fig.add_subplot(k, 4, 4 * i + j + 1)
            ax.imshow(panel, cmap=None if j == 0 else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    return _png(fig)

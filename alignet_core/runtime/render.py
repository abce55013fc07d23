"""What every stage's report part is made of: figures drawn on demand and embedded in markdown, and
the formatting of estimates and comparisons."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignet_core import plots
from alignet_core.stats.bootstrap import Comparison, Estimate


@dataclass(frozen=True)
class Figure:
    """One chart of a report: its file name under `figures/`, its alt text, and how to draw it (its PNG
    bytes, drawn when first asked for: a report folder that already holds the file does not redraw it)."""

    name: str
    alt: str
    draw: Callable[[], bytes]

    @functools.cached_property
    def png(self) -> bytes:
        return self.draw()


def inline(figures: list[Figure]) -> list[str]:
    """Markdown lines that embed each figure (a blank line before each): the Prefect artifacts' form."""
    return [line for f in figures for line in ("", plots.markdown_image(f.png, f.alt))]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def est(e: Estimate | None) -> str:
    return "n/a" if e is None else e.text()


def cmp_row(name: str, c: Comparison | None) -> str:
    """A markdown table row: name | before | after | change (each with its interval)."""
    if c is None:
        return f"| {name} | n/a | n/a | n/a |"
    return f"| {name} | {c.before.text()} | {c.after.text()} | {c.change.text()} |"

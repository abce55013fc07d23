"""How the embed stage shows its results: the `embed-summary` and `embed-changes` tables, its section of
the run's report (what changed in the source) and who made the embeddings."""

from __future__ import annotations

from typing import Any

from alignet_core.config import PipelineConfig
from alignet_core.embed.stage import EmbedOutput, SourceChanges


def embed_rows(out: EmbedOutput) -> list[dict[str, Any]]:
    """The `embed-summary` table: one row."""
    m = out.metrics
    row = {"images": m.n_images, "valid": m.n_valid, "dim": m.dim, "skipped": len(m.skipped),
           "seconds": m.seconds, "store": out.artifact}
    if m.imported is not None:
        row |= {"imported": m.imported.path, "sha256": m.imported.sha256, "dtype": m.imported.dtype}
    if (c := m.changes) is not None:
        row |= {"added": c.added, "changed": c.changed, "removed": c.removed, "reused": c.reused,
                "touched": c.touched, "listing_seconds": c.listing_seconds}
    return [row]


def change_rows(c: SourceChanges) -> list[dict[str, Any]]:
    """The `embed-changes` table: one row per kind of change, with its count and a few example ids (`touched`:
    reused rows whose size or mtime changed but not their bytes)."""
    return [{"change": kind, "images": n, "examples": ", ".join(ex)} for kind, n, ex in (
        ("added", c.added, c.added_examples), ("changed", c.changed, c.changed_examples),
        ("removed", c.removed, c.removed_examples), ("reused", c.reused, []),
        ("touched", c.touched, c.touched_examples))]


def change_line(c: SourceChanges) -> str:
    """The source's changes in one sentence of the report."""
    if c.previous is None:
        return (f"Source: {c.added} images listed in {c.listing_seconds:g} s (listing `{c.listing[:12]}`), the first "
                "store of its lineage: every image embedded.")
    parts = [f"{n} {kind}" + (f" (e.g. {', '.join(f'`{i}`' for i in ex[:3])})" if ex else "")
             for kind, n, ex in (("added", c.added, c.added_examples), ("changed", c.changed, c.changed_examples),
                                 ("removed", c.removed, c.removed_examples))]
    touched = (f" ({c.touched} of them touched: a new mtime, the same bytes, e.g. "
               f"{', '.join(f'`{i}`' for i in c.touched_examples[:3])})") if c.touched else ""
    return (f"Source: {'; '.join(parts)} since the previous store `{c.previous}`; {c.reused} embeddings reused"
            f"{touched}, {c.added + c.changed} computed (listing `{c.listing[:12]}`, {c.listing_seconds:g} s).")


def report_section(out: EmbedOutput) -> str | None:
    """The embed stage's section of `report.md`: what changed in a listed source (None for others)."""
    c = out.metrics.changes
    return None if c is None else f"## Images\n\n{change_line(c)}\n"


def teacher_line(cfg: PipelineConfig, emb: EmbedOutput) -> str:
    """Who made the embeddings: the timm model, or the imported array with its identity (the teacher
    settings do not apply to it)."""
    imp = emb.metrics.imported
    if imp is None:
        return cfg.embed.model
    return (f"imported: {imp.path} ({imp.format}, {' × '.join(map(str, imp.shape))} {imp.dtype}, sha256 "
            f"{imp.sha256[:12]}…, stored {cfg.embed.store_dtype}); embed.model and the other teacher settings do "
            "not apply")

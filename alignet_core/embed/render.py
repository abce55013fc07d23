"""How the embed stage shows its results: the `embed-summary` table and who made the embeddings."""

from __future__ import annotations

from typing import Any

from alignet_core.config import PipelineConfig
from alignet_core.embed.stage import EmbedOutput


def embed_rows(out: EmbedOutput) -> list[dict[str, Any]]:
    """The `embed-summary` table: one row."""
    m = out.metrics
    row = {"images": m.n_images, "valid": m.n_valid, "dim": m.dim, "skipped": len(m.skipped),
           "seconds": m.seconds, "store": out.artifact}
    if m.imported is not None:
        row |= {"imported": m.imported.path, "sha256": m.imported.sha256, "dtype": m.imported.dtype}
    return [row]


def teacher_line(cfg: PipelineConfig, emb: EmbedOutput) -> str:
    """Who made the embeddings: the timm model, or the imported array with its identity (the teacher
    settings do not apply to it)."""
    imp = emb.metrics.imported
    if imp is None:
        return cfg.embed.model
    return (f"imported: {imp.path} ({imp.format}, {' × '.join(map(str, imp.shape))} {imp.dtype}, sha256 "
            f"{imp.sha256[:12]}…, stored {cfg.embed.store_dtype}); embed.model and the other teacher settings do "
            "not apply")

"""The embed stage's declaration for the registry (data: no stage code is imported here)."""

from __future__ import annotations

from alignet_core.runtime.declaration import Stage

STAGE = Stage(
    name="embed", summary="teacher embeddings into a Zarr store", section="embed", inputs=(),
    run="alignet_core.embed.stage:run_embed", output="alignet_core.embed.stage:EmbedOutput",
    report="alignet_core.embed.render:report_section",
    deployment="teacher-embeddings", example="--set embed.batch_size=128", check="alignet_core.embed.checks:check",
)

"""The cluster stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.errors import ConfigError


def check(ctx: RunContext) -> None:
    """No more clusters than images."""
    k, n = ctx.cfg.cluster.k, len(ctx.source)
    if k > n:
        raise ConfigError(f"cluster.k: {k} clusters for {n} images; k must be at most the number of images")

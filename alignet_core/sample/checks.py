"""The sample stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.errors import ConfigError


def check(ctx: RunContext) -> None:
    """Each sampling strategy once."""
    strategies = list(ctx.cfg.sample.strategies)
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"sample.strategies: duplicates in {strategies}")

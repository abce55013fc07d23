"""The transform stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.errors import ConfigError
from alignet_core.human.data import no_human_data_message, proxy_taxonomy, trial_file


def check(ctx: RunContext) -> None:
    """A transform has human data to fit: a triplet file, or labels the taxonomy proxy can be drawn from."""
    cfg = ctx.cfg
    if trial_file(cfg.human) is None and cfg.transform.enabled and proxy_taxonomy(cfg, ctx.source) is None:
        raise ConfigError(no_human_data_message(ctx.source))

"""Flow parameters → a validated `PipelineConfig` (a YAML path plus dotted overrides)."""

from __future__ import annotations

from typing import Any

from alignet_core.config import PipelineConfig, load_config, parse_config, with_overrides
from alignet_core.pipeline.preflight import preflight


def resolve_config(config_path: str | None, overrides: dict[str, Any] | None) -> PipelineConfig:
    """Defaults (the demo) or the YAML file, then the overrides; validated and preflighted
    before any work starts."""
    cfg = load_config(config_path) if config_path else parse_config({})
    if overrides:
        cfg = with_overrides(cfg, overrides)
    preflight(cfg)
    return cfg

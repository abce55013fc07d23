"""Flow parameters → a validated `PipelineConfig` (a YAML path plus dotted overrides)."""

from __future__ import annotations

import logging
from typing import Any

from alignet_core.config import PipelineConfig, load_config, parse_config, with_overrides
from alignet_core.pipeline.preflight import preflight


def resolve_config(config_path: str | None, overrides: dict[str, Any] | None) -> PipelineConfig:
    """Defaults (the demo) or the YAML file, then the overrides; validated and preflighted
    before any work starts."""
    _pipeline_lines_at_info()
    cfg = load_config(config_path) if config_path else parse_config({})
    if overrides:
        cfg = with_overrides(cfg, overrides)
    preflight(cfg)
    return cfg


def _pipeline_lines_at_info() -> None:
    """The library's INFO lines (images embedded, fit results, dataset paths) reach the run's logs: Prefect
    hands `PREFECT_LOGGING_EXTRA_LOGGERS` its API handler but not a level, and Python's default is WARNING.
    A level set by the caller (the CLI's -v) is kept."""
    lib = logging.getLogger("alignet_core")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.INFO)

"""Flow parameters → a validated `PipelineConfig` (a YAML path plus dotted overrides).

`Overrides` is the flows' `overrides` parameter type: every dotted field of the config (sections and
leaves, e.g. `cluster` and `cluster.k`) with its type, nothing else. Prefect puts its JSON schema in
each deployment's parameter schema, so the server refuses a run whose overrides name an unknown field
or give a wrong type before the run is created; inside the flow the whole config is validated again
(ranges, cross-field rules) before any work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from alignet_core.config import PipelineConfig, load_config, parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.pipeline.preflight import preflight


def _dotted_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """dotted name → the field's annotation, for every field of `model` and of its sections."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        out[dotted] = info.annotation
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out.update(_dotted_fields(info.annotation, f"{dotted}."))
    return out


Overrides = create_model(
    "Overrides",
    __config__=ConfigDict(extra="forbid", populate_by_name=True),
    __doc__="Dotted config fields to set for this run, e.g. {\"cluster.k\": 500}; unknown fields are refused.",
    **{d.replace(".", "__"): (ann | None, Field(None, alias=d)) for d, ann in _dotted_fields(PipelineConfig).items()},
)


def as_dict(overrides: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """The overrides as `{dotted field: value}`: only the fields that were given."""
    if overrides is None:
        return {}
    if isinstance(overrides, BaseModel):
        return overrides.model_dump(by_alias=True, exclude_unset=True)
    return dict(overrides)


def parsed_config(config_path: str | None, overrides: BaseModel | dict[str, Any] | None) -> PipelineConfig:
    """Defaults (the demo) or the YAML file, then the overrides; every field validated (no file read but
    the YAML: `preflight` checks the inputs)."""
    cfg = load_config(config_path) if config_path else parse_config({})
    if given := as_dict(overrides):
        cfg = with_overrides(cfg, given)
    return cfg


_PREPARED: ContextVar[tuple[str, RunContext] | None] = ContextVar("alignet_prepared_context", default=None)


def _parameters_key(config_path: str | None, overrides: BaseModel | dict[str, Any] | None) -> str:
    return json.dumps([config_path, as_dict(overrides)], sort_keys=True, default=str)


@contextmanager
def prepared(ctx: RunContext, config_path: str | None, overrides: BaseModel | dict[str, Any] | None) -> Iterator[None]:
    """Within the block, a flow called with exactly these parameters takes `ctx` (which the caller built
    and preflighted: the CLI, before it starts the flow) instead of parsing, listing and reading again."""
    token = _PREPARED.set((_parameters_key(config_path, overrides), ctx))
    try:
        yield
    finally:
        _PREPARED.reset(token)


def resolve_context(config_path: str | None, overrides: BaseModel | dict[str, Any] | None) -> RunContext:
    """The run's context: `parsed_config`, then preflighted (inputs, devices, human data) before any work
    starts, which lists the source and reads the human data once for every stage; the one `prepared` for
    these parameters when there is one."""
    _pipeline_lines_at_info()
    held = _PREPARED.get()
    if held is not None and held[0] == _parameters_key(config_path, overrides):
        return held[1]
    return preflight(parsed_config(config_path, overrides))


def _pipeline_lines_at_info() -> None:
    """The library's INFO lines (images embedded, fit results, dataset paths) reach the run's logs: Prefect
    hands `PREFECT_LOGGING_EXTRA_LOGGERS` its API handler but not a level, and Python's default is WARNING.
    A level set by the caller (the CLI's -v) is kept."""
    lib = logging.getLogger("alignet_core")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.INFO)

"""The frozen pydantic bases: `Record` (plans, outputs, metrics, figures) and `ConfigModel` (config
sections)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A frozen pydantic model: the base of the plans, outputs and metrics stages hand on."""

    model_config = ConfigDict(frozen=True)


class ConfigModel(BaseModel):
    """A config section: unknown fields are refused (a typo fails naming the field), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

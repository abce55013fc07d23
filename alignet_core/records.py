"""The frozen pydantic bases: `Record` (plans, outputs, metrics, figures) and `ConfigModel` (config
sections)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A frozen pydantic model: the base of the plans, outputs and metrics stages hand on."""

    model_config = ConfigDict(frozen=True)


#: a field's metadata (`Field(..., json_schema_extra=NOT_IN_KEY)`): the field changes how a stage runs,
#: not what it makes, so it stays out of the stage's content key (`ConfigModel.key_dump`)
NOT_IN_KEY: dict[str, Any] = {"in_key": False}


class ConfigModel(BaseModel):
    """A config section: unknown fields are refused (a typo fails naming the field), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def fields_not_in_key(cls) -> set[str]:
        """The fields marked `NOT_IN_KEY`."""
        return {name for name, f in cls.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("in_key") is False}

    def key_dump(self, exclude: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        """The section as it enters a stage's content key: every field but those marked `NOT_IN_KEY` (and
        `exclude`)."""
        return self.model_dump(exclude=self.fields_not_in_key() | set(exclude))

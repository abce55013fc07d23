"""`Record`: the frozen pydantic model that plans, outputs, metrics and figures are made of."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A frozen pydantic model: the base of the plans, outputs and metrics stages hand on."""

    model_config = ConfigDict(frozen=True)

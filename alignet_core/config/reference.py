"""The config's reference page (`docs/config.md`), generated from the models: every section and field
with its type, default, whether it is part of its stage's content key, and its description.

    python -m alignet_core.config.reference > docs/config.md
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from alignet_core.config.pipeline import PipelineConfig
from alignet_core.records import ConfigModel


def _type(annotation: Any) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None").replace("alignet_core.config.", "")


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _section(model: type[BaseModel], name: str, seen: set[type] | None = None) -> list[str]:
    """The table of one section, then its nested sections (a section nested in itself, such as
    `source.images`, is shown once)."""
    seen = set() if seen is None else seen
    seen.add(model)
    off = model.fields_not_in_key() if issubclass(model, ConfigModel) else set()
    lines = [f"## `{name}`" if name else "## top level", "", (model.__doc__ or "").strip().splitlines()[0], "",
             "| field | type | default | in key | description |", "|---|---|---|---|---|"]
    nested = []
    for field_name, field in model.model_fields.items():
        ann = field.annotation
        section = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)
        if section is not None and section not in seen:
            nested.append((section, f"{name}.{field_name}" if name else field_name))
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        key = "(its fields)" if section is not None else "no" if field_name in off else "yes"
        lines.append(f"| `{field_name}` | `{_type(ann)}` | {_default(field)} | {key} | {desc} |")
    lines.append("")
    for section, dotted in nested:
        lines += _section(section, dotted, seen)
    return lines


def reference_markdown() -> str:
    """The whole reference page."""
    head = ["# Config reference", "",
            "Generated from the config models (`python -m alignet_core.config.reference > docs/config.md`); a test "
            "keeps it current. Every field can be set in the YAML file, or per run with `--set section.field=value` "
            "or a deployment's `overrides`. *in key*: whether the field is part of its stage's content key (a field "
            "that is not changes how or where a stage runs, not what it makes, so changing it reuses the outputs; "
            "marked on the field with `json_schema_extra=NOT_IN_KEY`).", ""]
    return "\n".join(head + _section(PipelineConfig, "")) .rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())

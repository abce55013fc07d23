"""The pipeline config: every stage's section (each defined beside its stage) nested under the settings
of the whole run, loaded from YAML.

Every model forbids unknown fields, so a typo fails loudly with the field's name instead of
being silently ignored. `load_config` turns pydantic's errors into one `ConfigError` whose
message names each offending field and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from alignet_core.config.base import Device
from alignet_core.config.cluster import ClusterConfig
from alignet_core.config.distill import DistillConfig
from alignet_core.config.embed import EmbedConfig
from alignet_core.config.evaluate import EvaluateConfig
from alignet_core.config.human import HumanConfig, ViceConfig
from alignet_core.config.sample import SampleConfig
from alignet_core.config.transform import TransformConfig
from alignet_core.errors import ConfigError
from alignet_core.io.limits import MAX_CONFIG_BYTES, load_yaml, short
from alignet_core.io.source_config import SourceConfig
from alignet_core.records import NOT_IN_KEY, ConfigModel


class PipelineConfig(ConfigModel):
    """The whole pipeline: where artifacts go, the seed, the hardware and every stage."""

    root: str = Field("alignet-data", json_schema_extra=NOT_IN_KEY,
                      description="artifact root (local path or fsspec URL)")
    dataset_name: str = Field(
        "demo", json_schema_extra=NOT_IN_KEY,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="name of the published dataset; a plain folder name (letters, digits, '.', '_', '-'), "
        "so the dataset stays under <root>/datasets/",
    )
    keep_versions: int | None = Field(
        None, ge=1, json_schema_extra=NOT_IN_KEY, description="published versions of the dataset to keep (oldest deleted first; null: keep all)"
    )
    lock_timeout: float | None = Field(
        None, json_schema_extra=NOT_IN_KEY,
        ge=0,
        description="seconds a stage waits for another run writing the same output on this root; "
        "null: as long as it takes (then reuses that output), 0: fail at once",
    )
    seed: int = Field(0, ge=0, description="fixes every random choice")
    device: Device = Field("auto", description="auto: cuda when available, else cpu")
    source: SourceConfig = Field(default_factory=SourceConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    human: HumanConfig = Field(default_factory=HumanConfig)
    transform: TransformConfig = Field(default_factory=TransformConfig)
    vice: ViceConfig = Field(default_factory=ViceConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("root")
    @classmethod
    def _local_urls_as_paths(cls, v: str) -> str:
        """`file://` roots are local paths: written as such, every writer (Zarr's included) uses
        the local file system directly."""
        return v.removeprefix("file://") or "/"

    @model_validator(mode="after")
    def _shipped_needs_demo(self) -> PipelineConfig:
        if self.human.shipped is not None and self.source.kind != "demo":
            raise ValueError(f"human.shipped: the shipped emoji map ties THINGS concepts to the demo emoji; it needs "
                             f"source.kind demo (got {self.source.kind!r}): for your own images give human.triplets "
                             "with human.concepts or human.objects")
        if self.human.densify is not None and self.transform.soft_targets == "vice":
            raise ValueError("transform.soft_targets: 'vice' fits VICE on each fold's triplets; with human.densify "
                             "the soft targets are already VICE's (fitted on every trial): use 'auto'")
        return self


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed in the config section that holds the field at `loc`."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        ann = info.annotation if info is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


MAX_PROBLEMS = 5  # problems one config error lists (a file of thousands of bad fields stays one short line)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _section_fields(tuple(e["loc"]))
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}: unknown field{hint}; expected one of {allowed}")
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {short(got)})"
        lines.append(f"{where}: {e['msg']}{got_s}")
    more = f"; and {len(lines) - MAX_PROBLEMS} more problem(s)" if len(lines) > MAX_PROBLEMS else ""
    return "; ".join(lines[:MAX_PROBLEMS]) + more


def parse_config(data: dict[str, Any] | None) -> PipelineConfig:
    """Validate a plain dict into a `PipelineConfig`; raise `ConfigError` naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_describe(err)}") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML pipeline config; a missing file or bad YAML is a `ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r}: {p.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} "
                          "a config may have")
    try:
        data = load_yaml(p.read_text(), f"config file {str(p)!r}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {what}") from None
    return parse_config(data)


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """Apply dotted overrides ({'cluster.k': 20}) and re-validate."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a config section")
            node = node[part]
        node[parts[-1]] = value
    return parse_config(data)

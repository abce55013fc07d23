"""Checks of a config's model settings before any work: the name is a timm model, the weights resolve."""

from __future__ import annotations

from alignet_core.errors import InputError
from alignet_core.models.refs import check_model_name, resolve_weights


def check_model(section: str, name: str, weights: str | None, name_field: str) -> None:
    """`<name_field>` names a timm model and `<section>.weights` resolves to a local file (or random init);
    `InputError` / `ConfigError` naming the field."""
    check_model_name(name, name_field)
    try:
        resolve_weights(name, weights)
    except InputError as err:  # "weights: ..." → "embed.weights: ...", naming the section
        raise InputError(f"{section}.{err}" if str(err).startswith("weights:") else str(err)) from None

"""What every config section is made of: a frozen model that forbids unknown fields, and the checks
of device lists shared by the sections that take them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import field_validator

Device = Literal["auto", "cpu", "cuda"]
#: the official AligNet samplings (`sample.strategies`; the student trains on one of them)
SamplingStrategy = Literal[
    "between_class", "within_class", "class_border", "cluster", "cluster_border"
]




# why one list of devices must be of one kind, per use
_ONE_KIND_EMBED = "GPUs embed in bf16, the CPU in float32, so one store would hold rows of two precisions"


def device_list_problem(devices: list[str], one_kind_because: str = _ONE_KIND_EMBED) -> str | None:
    """What is wrong with a list of device strings ('cpu' or 'cuda' / 'cuda:<i>', one kind), or None.
    `one_kind_because` says, in the message for a mix of cpu and cuda, why one kind is needed."""
    if not devices:
        return "an empty list; give devices such as ['cuda:0', 'cuda:1'] or null"
    bad = [d for d in devices if not isinstance(d, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", d)]
    if bad:
        return f"{bad} are not devices; expected 'cpu', 'cuda' or 'cuda:<index>'"
    if len({d.split(":")[0] for d in devices}) > 1:
        return f"{list(devices)} mixes cpu and cuda; use one kind ({one_kind_because})"
    return None


def devices_validator(problem_of: Callable[[list[str]], str | None]) -> Any:
    """A validator of a `devices` field: the strings are checked when the config loads (`problem_of`);
    whether the GPUs exist is checked before the stage runs (`hardware.resolve_devices`)."""

    def check(cls: type, v: list[str] | None) -> list[str] | None:
        problem = None if v is None else problem_of(v)
        if problem:
            raise ValueError(problem)
        return v

    return field_validator("devices")(check)

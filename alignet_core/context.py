"""The run context: what one run reads once and every stage shares.

A run lists its image source once (a folder of a million files is a million `stat`s, not to be
repeated per stage) and reads and splits its human data once (a THINGS file is 4.7M triplets); the
stages take them from here instead of reading them again. `pipeline.preflight.preflight` builds the
context while it checks the config, so the checks and the run see the same listing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from alignet_core.config import PipelineConfig
from alignet_core.human.data import HumanData, human_data_or_none
from alignet_core.io import sources
from alignet_core.io.listing import SourceListing, listing_of

T = TypeVar("T")


class RunContext:
    """cfg: the validated config; source: the image source, listed; listing: its identity (the digest of
    every image's id, size and mtime, `io.listing`: part of the embed stage's key); human: the human data (a triplet file
    or the taxonomy proxy) split into object folds, or None when the run has none. Each is read on first
    use and kept: preflight reads what it checks, and a stage that needs neither (embed never needs the
    human data) reads nothing it does not use.

    A plain object (not a dataclass or a model): Prefect hands it to tasks as it is, without walking
    the listing's records."""

    __slots__ = ("_human", "_human_read", "_list_seconds", "_listing", "_plans", "_source", "cfg")

    def __init__(self, cfg: PipelineConfig, source: sources.ImageSource | None = None) -> None:
        self.cfg = cfg
        self._source = source
        self._list_seconds = 0.0
        self._listing: SourceListing | None = None
        self._human: HumanData | None = None
        self._human_read = False
        self._plans: dict[tuple[str, str], Any] = {}

    @classmethod
    def of(cls, cfg: PipelineConfig, source: sources.ImageSource | None = None) -> RunContext:
        """The context of `cfg` (with `source`, a listing of its source, when the caller has one)."""
        return cls(cfg, source)

    @property
    def source(self) -> sources.ImageSource:
        """The run's image source, listed the first time it is asked for."""
        if self._source is None:
            t0 = time.perf_counter()
            self._source = sources.source_from_config(self.cfg.source)
            self._list_seconds = time.perf_counter() - t0
        return self._source

    @property
    def listing(self) -> SourceListing:
        """The source's listing (ids, sizes, mtimes and their digest), taken from the run's one listing of
        the source the first time it is asked for: every stage of the run sees the same images."""
        if self._listing is None:
            self._listing = listing_of(self.source, self._list_seconds)
        return self._listing

    @property
    def human(self) -> HumanData | None:
        """The run's human data, read and split the first time it is asked for (errors name the `human.*`
        field or file)."""
        if not self._human_read:
            self._human = human_data_or_none(self.cfg, self.source)
            self._human_read = True
        return self._human

    def plan(self, planner: Callable[..., T], *inputs: Any) -> T:
        """`planner(cfg, *inputs)` (a stage's content key and directory), computed once per run for the same
        planner and inputs: Prefect's cache policy and the stage's run use the one plan."""
        key = (f"{planner.__module__}.{planner.__qualname__}", repr([getattr(i, "key", i) for i in inputs]))
        if key not in self._plans:
            self._plans[key] = planner(self.cfg, *inputs)
        return self._plans[key]

    def __repr__(self) -> str:
        return f"RunContext(root={self.cfg.root!r}, listed={self._source is not None})"

"""Flow: distillation of the student on the published dataset (the hand-off target)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignet_core.stages import StageOutput
from flows._config import resolve_config
from flows.sample import sample_on_dask
from tasks.cluster import cluster
from tasks.distill import distill
from tasks.embed import embed
from tasks.transform import fit_transform


@flow(name="distill")
def distill_flow(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> StageOutput:
    """Stage 4 alone: finetune the student (earlier stages come from the cache or are computed)."""
    cfg = resolve_config(config_path, overrides)
    tfm = fit_transform(cfg, embed(cfg))
    ds = sample_on_dask(cfg, tfm, cluster(cfg, tfm))
    return distill(cfg, ds)

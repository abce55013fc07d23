"""Flow: distillation of the student (the hand-off target of the dataset flow).

With `distill.dataset` set it trains on that folder of official-format files alone, so a
deployment can send it to a GPU work pool without rerunning (or even having) earlier stages.
"""

from __future__ import annotations

from prefect import flow

from alignet_core.distill.stage import DistillOutput
from flows._config import Overrides, resolve_config
from flows.sample import sample_on_dask
from tasks.cluster import cluster
from tasks.distill import distill
from tasks.embed import embedded
from tasks.transform import fit_transform


@flow(name="distill")
def distill_flow(config_path: str | None = None, overrides: Overrides | None = None) -> DistillOutput:
    """Stage 4: finetune the student on `distill.dataset`, or on the pipeline's own dataset
    (earlier stages then come from the cache or are computed)."""
    cfg = resolve_config(config_path, overrides)
    if cfg.distill.dataset is not None:
        return distill(cfg, None)
    tfm = fit_transform(cfg, embedded(cfg))
    return distill(cfg, sample_on_dask(cfg, tfm, cluster(cfg, tfm)))

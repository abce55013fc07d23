"""Flow: evaluation alone, on the pipeline's own student or on any given one (`evaluate.student`)."""

from __future__ import annotations

from prefect import flow

from alignet_core.evaluate.stage import EvaluateOutput
from flows._config import Overrides, resolve_config
from flows.sample import sample_on_dask
from tasks.cluster import cluster
from tasks.distill import distill
from tasks.embed import embedded
from tasks.evaluate import evaluate
from tasks.transform import fit_transform


@flow(name="evaluate")
def evaluate_flow(config_path: str | None = None, overrides: Overrides | None = None) -> EvaluateOutput:
    """Stage 5: the teacher (raw and aligned) and a student (pretrained and distilled) on every
    evaluation set. The student is `evaluate.student` when given; else the pipeline's own (its
    stages come from the cache or are computed); none when distillation is disabled."""
    cfg = resolve_config(config_path, overrides)
    emb = embedded(cfg)
    tfm = fit_transform(cfg, emb)
    student = None
    if cfg.evaluate.student is None and cfg.distill.enabled:
        student = distill(cfg, None if cfg.distill.dataset else sample_on_dask(cfg, tfm, cluster(cfg, tfm)))
    return evaluate(cfg, emb, tfm, student)

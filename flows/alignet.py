"""The end-to-end AligNet flow: images → embeddings → transform → clusters → triplets → student → evaluation."""

from __future__ import annotations

from prefect import flow

from alignet_core.distill.stage import distill_runs
from alignet_core.pipeline.report import RunOutputs, RunSummary
from flows._config import Overrides, resolve_config
from flows.sample import sample_on_dask
from tasks.cluster import cluster
from tasks.distill import distill
from tasks.embed import embedded
from tasks.evaluate import evaluate
from tasks.report import report
from tasks.transform import fit_transform


@flow(name="alignet")
def alignet(config_path: str | None = None, overrides: Overrides | None = None) -> RunSummary:
    """Run every stage (each cached on its content key) and return the run's summary."""
    cfg = resolve_config(config_path, overrides)
    emb = embedded(cfg)
    tfm = fit_transform(cfg, emb)
    clu = cluster(cfg, tfm)
    ds = sample_on_dask(cfg, tfm, clu)
    student = distill(cfg, ds) if distill_runs(cfg) else None
    alignment = evaluate(cfg, emb, tfm, student) if cfg.evaluate.enabled else None
    return report(cfg, RunOutputs(embed=emb, transform=tfm, cluster=clu, sample=ds, distill=student,
                                  evaluate=alignment))


if __name__ == "__main__":
    alignet()

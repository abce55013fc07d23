"""Task: fit the human-aligned teacher transform and apply it (stage 1)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from alignet_core import plots

from alignet_core.io import store

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def transform_markdown(out: stages.StageOutput) -> str:
    """Before/after accuracy, the local-structure score, the hyper-parameters used (and every
    setting a search tried), and the held-out accuracy per epoch."""
    m = out.metrics
    hp = m.get("hyperparameters", {})
    rows = [
        ("human data", m["human_data"]),
        ("held-out triplets", m["n_heldout"]),
        ("odd-one-out accuracy before", f"{100 * m['acc_before']:.1f}%"),
        ("odd-one-out accuracy after", f"{100 * m['acc_after']:.1f}%"),
        (f"local structure: {m['knn_k']}-NN overlap before/after", f"{m['knn_overlap']:.3f}"),
        ("soft targets", m.get("soft_targets", "n/a")),
    ]
    if "vice" in m:
        rows.append(("VICE held-out accuracy / dims", f"{100 * m['vice']['val_acc']:.1f}% / {m['vice']['dims']}"))
    lines = [
        f"# Transform: held-out accuracy {100 * m['acc_before']:.1f}% → {100 * m['acc_after']:.1f}%",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Hyper-parameters used: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in hp.items()),
    ]
    search = m.get("search")
    if search:
        lines += ["", f"Search ({search['n_folds']}-fold cross-validation over objects; chosen: alpha = "
                  f"{search['best']['alpha']}, lam = {search['best']['lam']}, lr = {search['best']['lr']}):", "",
                  "| alpha | lam | lr | held-out accuracy | k-NN overlap |", "|---|---|---|---|---|"]
        lines += [f"| {s['alpha']} | {s['lam']} | {s['lr']} | {s['transformed_mean']:.3f} | {s['knn_overlap_mean']:.3f} |"
                  for s in search["settings"]]
    curve = [h["val_acc"] for h in m.get("history", []) if "val_acc" in h]
    if curve:
        lines += ["", plots.markdown_image(plots.curve_png({"held-out accuracy": curve}, "epoch", "accuracy",
                                                           "transform fit"), "held-out accuracy per epoch")]
    return "\n".join(lines) + "\n"


@task(name="fit-transform", persist_result=True, retries=1, retry_delay_seconds=5)
def transform_task(cfg: PipelineConfig, emb: stages.StageOutput) -> stages.StageOutput:
    out = stages.run_transform(cfg, emb)
    if out.metrics.get("enabled"):
        create_markdown_artifact(key="transform-accuracy", markdown=transform_markdown(out),
                                 description="Teacher odd-one-out accuracy before and after the transform, "
                                 "local structure kept, hyper-parameters")
    return out


def fit_transform(cfg: PipelineConfig, emb: stages.StageOutput) -> stages.StageOutput:
    plan = stages.plan_transform(cfg, emb)
    return cached_call(transform_task, plan.key, store.is_complete(plan.dir), cfg, emb)

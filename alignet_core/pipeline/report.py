"""What a run reports, and the one place its markdown is rendered.

`summarize` turns the stages' typed outputs into a `RunSummary` (written as `summary.json`);
`write_report` writes it and `report.md` under `<root>/reports/<dataset>/<last key>/`. The
`*_markdown` functions render the run report and each stage's Prefect artifact; the tasks only
publish what these return.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np

from alignet_core import plots
from alignet_core.cluster.stage import ClusterOutput
from alignet_core.config import PipelineConfig
from alignet_core.distill.stage import DistillOutput
from alignet_core.embed.stage import EmbedOutput
from alignet_core.io import store
from alignet_core.pipeline.runner import Record
from alignet_core.sample.stage import DatasetFile, SampleOutput
from alignet_core.transform.stage import TransformOutput


class RunOutputs(Record):
    """Every stage output of one end-to-end run (distill is None when it is disabled)."""

    embed: EmbedOutput
    transform: TransformOutput
    cluster: ClusterOutput
    sample: SampleOutput
    distill: DistillOutput | None = None

    def stages(self) -> dict[str, Any]:
        return {name: out for name, out in (("embed", self.embed), ("transform", self.transform),
                                            ("cluster", self.cluster), ("sample", self.sample),
                                            ("distill", self.distill)) if out is not None}


class RunSummary(Record):
    """The machine-readable summary of one pipeline run (`summary.json`)."""

    dataset: str
    dataset_version: str
    transform_acc_before: float | None
    transform_acc_after: float | None
    human_data: str | None
    cluster_nmi: float | None
    cluster_ari: float | None
    cluster_sizes: list[int]
    n_triplets: int
    dataset_files: dict[str, DatasetFile]
    student_strategy: str
    student_acc_before: float | None
    student_acc_after: float | None
    student_human_acc_before: float | None
    student_human_acc_after: float | None
    student_acc_before_by_sampling: dict[str, float] | None
    student_acc_after_by_sampling: dict[str, float] | None
    stage_seconds: dict[str, float]
    stage_keys: dict[str, str]
    report_dir: str


def summarize(cfg: PipelineConfig, outs: RunOutputs, report_dir: str) -> RunSummary:
    """The summary of one run; `report_dir` is where its report is written."""
    t, c, s = outs.transform.metrics, outs.cluster.metrics, outs.sample.metrics
    d = outs.distill.metrics if outs.distill is not None else None
    strategy = d.sampling if d is not None else cfg.distill.strategy
    return RunSummary(
        dataset=outs.sample.artifact,
        dataset_version=s.version,
        transform_acc_before=t.acc_before,
        transform_acc_after=t.acc_after,
        human_data=t.human_data,
        cluster_nmi=c.nmi,
        cluster_ari=c.ari,
        cluster_sizes=c.sizes,
        n_triplets=s.n_triplets,
        dataset_files=s.files,
        student_strategy=strategy,
        student_acc_before=None if d is None else d.acc_before.get(strategy),
        student_acc_after=None if d is None else d.acc_after.get(strategy),
        student_human_acc_before=None if d is None else d.human_acc_before,
        student_human_acc_after=None if d is None else d.human_acc_after,
        student_acc_before_by_sampling=None if d is None else d.acc_before,
        student_acc_after_by_sampling=None if d is None else d.acc_after,
        stage_seconds={name: o.metrics.seconds for name, o in outs.stages().items()},
        stage_keys={name: o.key for name, o in outs.stages().items()},
        report_dir=report_dir,
    )


def write_report(cfg: PipelineConfig, outs: RunOutputs) -> RunSummary:
    """Write `<root>/reports/<dataset>/<last key>/{report.md,summary.json}`; return the summary."""
    last = outs.distill or outs.sample
    folder = store.join(cfg.root, "reports", cfg.dataset_name, last.key)
    summary = summarize(cfg, outs, folder)
    store.write_json_atomic(store.join(folder, "summary.json"), summary.model_dump(mode="json"))
    with fsspec.open(store.join(folder, "report.md"), "w") as f:
        f.write(run_markdown(summary))
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def run_markdown(summary: RunSummary) -> str:
    """A short markdown report of a run (`report.md`, and the `alignet-report` artifact)."""
    s = summary
    lines = [
        "# AligNet pipeline report",
        "",
        f"Dataset: `{s.dataset}` ({s.n_triplets} triplets)",
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| teacher held-out odd-one-out accuracy ({s.human_data}) | {_pct(s.transform_acc_before)} "
        f"| {_pct(s.transform_acc_after)} |",
        f"| student triplet accuracy vs teacher ({s.student_strategy}) | "
        f"{_pct(s.student_acc_before)} | {_pct(s.student_acc_after)} |",
        f"| student odd-one-out accuracy on held-out human triplets ({s.human_data}) | "
        f"{_pct(s.student_human_acc_before)} | {_pct(s.student_human_acc_after)} |",
        "",
        "Clusters vs labels: " + ("no labels" if s.cluster_nmi is None else
                                  f"NMI {s.cluster_nmi:.3f}, ARI {s.cluster_ari:.3f}"),
        "",
        "| stage | seconds | key |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sec} | `{s.stage_keys[name]}` |" for name, sec in s.stage_seconds.items()]
    return "\n".join(lines) + "\n"


def embed_rows(out: EmbedOutput) -> list[dict[str, Any]]:
    """The `embed-summary` table: one row."""
    m = out.metrics
    return [{"images": m.n_images, "valid": m.n_valid, "dim": m.dim, "skipped": len(m.skipped),
             "seconds": m.seconds, "store": out.artifact}]


def transform_markdown(out: TransformOutput) -> str:
    """Before/after accuracy, the local-structure score, the hyper-parameters used (and every
    setting a search tried), and the held-out accuracy per epoch."""
    m = out.metrics
    rows = [
        ("human data", m.human_data),
        ("held-out triplets", m.n_heldout),
        ("odd-one-out accuracy before", _pct(m.acc_before)),
        ("odd-one-out accuracy after", _pct(m.acc_after)),
        (f"local structure: {m.knn_k}-NN overlap before/after", f"{m.knn_overlap:.3f}"),
        ("soft targets", m.soft_targets or "n/a"),
    ]
    if m.vice is not None:
        rows.append(("VICE held-out accuracy / dims", f"{_pct(m.vice.val_acc)} / {m.vice.dims}"))
    hp = m.hyperparameters.model_dump() if m.hyperparameters is not None else {}
    lines = [
        f"# Transform: held-out accuracy {_pct(m.acc_before)} → {_pct(m.acc_after)}",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Hyper-parameters used: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in hp.items()),
    ]
    if m.search is not None:
        best = m.search.best
        lines += ["", f"Search ({m.search.n_folds}-fold cross-validation over objects; chosen: alpha = "
                  f"{best['alpha']}, lam = {best['lam']}, lr = {best['lr']}):", "",
                  "| alpha | lam | lr | held-out accuracy | k-NN overlap |", "|---|---|---|---|---|"]
        lines += [f"| {r.alpha} | {r.lam} | {r.lr} | {r.transformed_mean:.3f} | {r.knn_overlap_mean:.3f} |"
                  for r in m.search.settings]
    curve = [h["val_acc"] for h in m.history if "val_acc" in h]
    if curve:
        lines += ["", plots.markdown_image(plots.curve_png({"held-out accuracy": curve}, "epoch", "accuracy",
                                                           "transform fit"), "held-out accuracy per epoch")]
    return "\n".join(lines) + "\n"


def cluster_markdown(out: ClusterOutput) -> str:
    """Cluster sizes (a table and a chart) and agreement with the source's labels."""
    m = out.metrics
    sizes = np.asarray(m.sizes)
    agreement = (f"NMI {m.nmi:.3f}, ARI {m.ari:.3f} against the source's labels" if m.nmi is not None
                 else "no source labels to compare with")
    return "\n".join([
        f"# k-means, k = {m.k}",
        "",
        f"{agreement}; inertia {m.inertia:.4g}.",
        "",
        "| smallest | median | largest | empty |",
        "|---|---|---|---|",
        f"| {sizes.min()} | {int(np.median(sizes))} | {sizes.max()} | {int((sizes == 0).sum())} |",
        "",
        plots.markdown_image(plots.sizes_png(m.sizes, f"cluster sizes (k = {m.k})"), "cluster sizes"),
    ])


def dataset_rows(out: SampleOutput) -> list[dict[str, Any]]:
    """The `dataset-files` table: one row per published file."""
    return [{"file": name, **info.model_dump(exclude={"sha256"})} for name, info in out.metrics.files.items()]


def student_markdown(out: DistillOutput) -> str:
    """The student's accuracy table, accuracy bars and loss curve, as one markdown document."""
    m = out.metrics
    rows = [(s, f"triplets vs teacher: {s}", m.acc_before[s], m.acc_after[s]) for s in m.acc_after]
    if m.human_acc_after is not None:
        rows.append(("human", f"human odd-one-out ({m.human_data}, {m.n_human_test} held out)",
                     m.human_acc_before, m.human_acc_after))
    lines = [
        f"# Student after {m.steps} steps on `{m.sampling}` ({m.n_train} training triplets)",
        "",
        "| held-out accuracy | before | after |",
        "|---|---|---|",
        *[f"| {name} | {_pct(b)} | {_pct(a)} |" for _, name, b, a in rows],
        "",
        f"Final loss {m.final_loss:.5f}; training {m.train_seconds:.1f} s, stage {m.seconds:.1f} s.",
        "",
        plots.markdown_image(plots.before_after_png({short: (b, a) for short, _, b, a in rows},
                                                    "student accuracy (held out)", chance=1 / 3),
                             "student accuracy before and after"),
        "",
        plots.markdown_image(plots.loss_curve_png(m.loss_curve, "distillation loss"), "loss curve"),
        "",
        f"Output: `{out.artifact}`",
    ]
    return "\n".join(lines) + "\n"

"""What a run reports, and the one place its markdown is rendered.

`summarize` turns the stages' typed outputs into a `RunSummary` (written as `summary.json`);
`write_report` writes it and `report.md` under `<root>/reports/<dataset>/<last key>/`. The
`*_markdown` functions render the run report and each stage's Prefect artifact; the tasks only
publish what these return.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from alignet_core import plots
from alignet_core.cluster.stage import ClusterOutput
from alignet_core.config import PipelineConfig
from alignet_core.distill.stage import DistillOutput, no_pixels_reason
from alignet_core.embed.stage import EmbedOutput
from alignet_core.evaluate.stage import EvaluateOutput
from alignet_core.io import store
from alignet_core.pipeline.runner import Record
from alignet_core.sample.stage import DatasetFile, SampleOutput
from alignet_core.stats.bootstrap import Comparison, Difference, Estimate
from alignet_core.transform.heldout import HeldOut, TripletSplitFigures
from alignet_core.transform.stage import TransformOutput


class RunOutputs(Record):
    """Every stage output of one end-to-end run (distill and evaluate are None when disabled)."""

    embed: EmbedOutput
    transform: TransformOutput
    cluster: ClusterOutput
    sample: SampleOutput
    distill: DistillOutput | None = None
    evaluate: EvaluateOutput | None = None

    def stages(self) -> dict[str, Any]:
        return {name: out for name, out in (("embed", self.embed), ("transform", self.transform),
                                            ("cluster", self.cluster), ("sample", self.sample),
                                            ("distill", self.distill), ("evaluate", self.evaluate)) if out is not None}


class RunSummary(Record):
    """The machine-readable summary of one pipeline run (`summary.json`).

    The headline is `alignment`: every model's accuracy at every abstraction level and on the
    held-out human (or proxy) triplets, object-disjoint, with 95% intervals, and the aligned − raw
    changes with paired intervals (`alignment_changes`). The point values of the earlier summary
    are kept (`transform_acc_*`: the test fold's zero-shot (cosine) and transformed accuracies;
    `student_*`), with their intervals beside them (`transform_heldout`, `student_heldout`,
    `student_human`)."""

    dataset: str
    dataset_version: str
    images: int = 0
    images_skipped: int = 0
    teacher: str = ""  # the timm model, or "imported: <path> (...)" for imported embeddings
    notes: list[str] = []  # stages not run and why (e.g. distillation without pixels)
    skipped_reasons: dict[str, int] = {}
    human_data: str | None
    alignment: dict[str, dict[str, Estimate]] | None
    alignment_changes: dict[str, dict[str, Difference]] | None
    alignment_models: dict[str, str] | None
    transform_acc_before: float | None
    transform_acc_after: float | None
    transform_heldout: HeldOut | None
    transform_triplet_split: TripletSplitFigures | None
    cluster_nmi: float | None
    cluster_ari: float | None
    cluster_sizes: list[int]
    n_triplets: int
    dataset_files: dict[str, DatasetFile]
    student_strategy: str
    student_acc_before: float | None
    student_acc_after: float | None
    student_heldout: Comparison | None
    student_human_acc_before: float | None
    student_human_acc_after: float | None
    student_human: Comparison | None
    student_acc_before_by_sampling: dict[str, float] | None
    student_acc_after_by_sampling: dict[str, float] | None
    stage_seconds: dict[str, float]
    stage_keys: dict[str, str]
    report_dir: str


def summarize(cfg: PipelineConfig, outs: RunOutputs, report_dir: str) -> RunSummary:
    """The summary of one run; `report_dir` is where its report is written."""
    t, c, s = outs.transform.metrics, outs.cluster.metrics, outs.sample.metrics
    d = outs.distill.metrics if outs.distill is not None else None
    ev = outs.evaluate.metrics if outs.evaluate is not None else None
    strategy = d.sampling if d is not None else cfg.distill.strategy
    return RunSummary(
        dataset=outs.sample.artifact,
        dataset_version=s.version,
        images=outs.embed.metrics.n_images,
        images_skipped=len(outs.embed.metrics.skipped),
        skipped_reasons=outs.embed.metrics.skipped_reasons(),
        teacher=teacher_line(cfg, outs.embed),
        notes=run_notes(cfg, outs),
        human_data=t.human_data,
        alignment=None if ev is None else ev.scores,
        alignment_changes=None if ev is None else ev.changes,
        alignment_models=None if ev is None else ev.models,
        transform_acc_before=t.acc_before,
        transform_acc_after=t.acc_after,
        transform_heldout=t.heldout,
        transform_triplet_split=t.triplet_split,
        cluster_nmi=c.nmi,
        cluster_ari=c.ari,
        cluster_sizes=c.sizes,
        n_triplets=s.n_triplets,
        dataset_files=s.files,
        student_strategy=strategy,
        student_acc_before=None if d is None else d.acc_before.get(strategy),
        student_acc_after=None if d is None else d.acc_after.get(strategy),
        student_heldout=None if d is None else d.heldout.get(strategy),
        student_human_acc_before=None if d is None else d.human_acc_before,
        student_human_acc_after=None if d is None else d.human_acc_after,
        student_human=None if d is None else d.human,
        student_acc_before_by_sampling=None if d is None else d.acc_before,
        student_acc_after_by_sampling=None if d is None else d.acc_after,
        stage_seconds={name: o.metrics.seconds for name, o in outs.stages().items()},
        stage_keys={name: o.key for name, o in outs.stages().items()},
        report_dir=report_dir,
    )


def write_report(cfg: PipelineConfig, outs: RunOutputs) -> RunSummary:
    """Write `<root>/reports/<dataset>/<last key>/{report.md,summary.json}`; return the summary."""
    last = outs.evaluate or outs.distill or outs.sample
    folder = store.join(cfg.root, "reports", cfg.dataset_name, last.key)
    summary = summarize(cfg, outs, folder)
    store.write_json_atomic(store.join(folder, "summary.json"), summary.model_dump(mode="json"))
    text = run_markdown(summary)
    if outs.evaluate is not None:
        text += "\n" + alignment_markdown(outs.evaluate)
        if outs.evaluate.metrics.saliency is not None:
            text += "\n" + saliency_markdown(outs.evaluate, picture=False)
    figures = report_figures(outs)
    if figures:
        text += "\n" + write_figures(folder, figures)
    with fsspec.open(store.join(folder, "report.md"), "w") as f:
        f.write(text)
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _est(e: Estimate | None) -> str:
    return "n/a" if e is None else e.text()


def _cmp_row(name: str, c: Comparison | None) -> str:
    if c is None:
        return f"| {name} | n/a | n/a | n/a |"
    return f"| {name} | {c.before.text()} | {c.after.text()} | {c.change.text()} |"


def run_markdown(summary: RunSummary) -> str:
    """A short markdown report of a run (`report.md`, and the `alignet-report` artifact). Every
    accuracy carries its 95% interval; a change whose interval covers 0 says so in words."""
    s = summary
    h = s.transform_heldout
    teacher = None if h is None else Comparison(before=h.zero_shot, after=h.transformed, change=h.gain)
    lines = [
        "# AligNet pipeline report",
        "",
        f"Dataset: `{s.dataset}` ({s.n_triplets} triplets). Human data: {s.human_data}.",
        "",
        _skipped_line(s),
        "",
        *([f"Teacher: {s.teacher}.", ""] if s.teacher else []),
        *(line for note in s.notes for line in (note, "")),
        "| held-out accuracy (95% interval) | before | after | change |",
        "|---|---|---|---|",
        _cmp_row(f"teacher, odd-one-out on test-fold objects ({h.n_objects if h else 0} objects never fitted)",
                 teacher),
        _cmp_row(f"student, triplet accuracy vs the teacher ({s.student_strategy})", s.student_heldout),
        _cmp_row("student, odd-one-out on test-fold objects", s.student_human),
        "",
        "Before: the reference zero-shot protocol (cosine similarity of raw features); after: dot products of the "
        "aligned representation. "
        + ("" if s.transform_triplet_split is None else
           f"Secondary, not object-disjoint: {s.transform_triplet_split.label}: "
           f"{s.transform_triplet_split.zero_shot.text()} → {s.transform_triplet_split.transformed.text()}."),
        "",
        "Clusters vs labels: " + ("no labels" if s.cluster_nmi is None else
                                  f"NMI {s.cluster_nmi:.3f}, ARI {s.cluster_ari:.3f}"),
        "",
        "| stage | seconds | key |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sec} | `{s.stage_keys[name]}` |" for name, sec in s.stage_seconds.items()]
    return "\n".join(lines) + "\n"


def teacher_line(cfg: PipelineConfig, emb: EmbedOutput) -> str:
    """Who made the embeddings: the timm model, or the imported array with its identity (the teacher
    settings do not apply to it)."""
    imp = emb.metrics.imported
    if imp is None:
        return cfg.embed.model
    return (f"imported: {imp.path} ({imp.format}, {' × '.join(map(str, imp.shape))} {imp.dtype}, sha256 "
            f"{imp.sha256[:12]}…, stored {cfg.embed.store_dtype}); embed.model and the other teacher settings do "
            "not apply")


def run_notes(cfg: PipelineConfig, outs: RunOutputs) -> list[str]:
    """What the run left out and why, in words."""
    reason = no_pixels_reason(cfg)
    if cfg.distill.enabled and outs.distill is None and reason is not None:
        return [f"Distillation: skipped: {reason}."]
    return []


def _skipped_line(s: RunSummary) -> str:
    if not s.images_skipped:
        return f"Images: {s.images}, none skipped."
    reasons = "; ".join(f"{n} × {r}" for r, n in s.skipped_reasons.items())
    return (f"**Images: {s.images}, {s.images_skipped} skipped ({100 * s.images_skipped / max(s.images, 1):.1f}%)**, "
            f"their rows unused by every stage (the `embed-skipped` artifact lists them). Reasons: {reasons}.")


def alignment_markdown(out: EvaluateOutput) -> str:
    """The `alignment-levels` table: one row per model, one column per evaluation set (accuracy
    with its 95% interval), the aligned − raw changes, the paper's reference ranges and, where
    human choice probabilities exist, the uncertainty agreement."""
    m = out.metrics
    names = list(m.sets)
    lines = ["# Alignment by level of abstraction (held-out objects, 95% intervals)", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m.models[model]} | " + " | ".join(_est(by_set.get(n)) for n in names) + " |"
              for model, by_set in m.scores.items()]
    if m.changes:
        lines += ["", "| change, aligned − raw | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {side} | " + " | ".join(by_set[n].text() for n in names) + " |" for side, by_set in m.changes.items()]
    if m.reference:
        lines += ["", "The AligNet paper, for reference: " + "; ".join(f"{k}: {v}" for k, v in m.reference.items()) + "."]
    lines += ["", *[f"- `{n}` ({i.kind}, {i.n_triplets} triplets, intervals resample {i.resample}): {i.definition}"
                    for n, i in m.sets.items()]]
    if m.human_data and "proxy" in m.human_data:
        lines += ["", f"The `human` column is the {m.human_data}: its figures say how well the models follow a "
                  "taxonomy, not people."]
    rows = [(model, n, u) for model, by_set in m.uncertainty.items() for n, u in by_set.items()]
    if rows:
        lines += ["", "| uncertainty vs human choice probabilities | set | T | NLL | JSD | entropy Spearman | ECE |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {m.models[model]} | {n} | {m.temperatures.get(model, float('nan')):.3g} | {u.nll:.3f} | "
                  f"{u.jsd:.3f} | {u.entropy_spearman:.3f} | {u.ece:.3f} |" for model, n, u in rows]
    return "\n".join(lines) + "\n"


def saliency_markdown(out: EvaluateOutput, picture: bool = True) -> str:
    """The `saliency-alignment` artifact: the "where" metric of the pretrained and finetuned student
    (Spearman and top-10% IoU/Dice of saliency vs importance maps, means with 95% intervals), the
    paired change, and (with `picture`) a few images side by side."""
    a = out.metrics.saliency
    if a is None:
        return ""
    proxy = "proxy" in a.maps
    title = "Where the student looks" + (" (against PROXY maps)" if proxy else "")
    lines = [f"# {title}", "", f"Maps: {a.maps}. Images: {a.n_images} {a.images}. Saliency: max |∂ logit / ∂ pixel| "
             f"of the {a.label_rule}.", "",
             "| student | Spearman | IoU top 10% | Dice top 10% |", "|---|---|---|---|"]
    for name, sc in (("pretrained", a.before), ("finetuned", a.after)):
        lines.append(f"| {name} | {sc.spearman.text()} | {sc.iou_top10.text()} | {sc.dice_top10.text()} |")
    c = a.spearman_change
    lines += ["", f"Spearman change, finetuned − pretrained (paired): {c.text()}"
              + ("" if c.n == 0 or c.low > 0 or c.high < 0 else ", no significant change") + "."]
    if proxy:
        lines += ["", "The maps are a proxy (the emoji's silhouettes): they say where the object is, not which of its "
                  "parts people find diagnostic."]
    if picture:
        lines += _inline(saliency_figures(out))
    return "\n".join(lines) + "\n"


def embed_rows(out: EmbedOutput) -> list[dict[str, Any]]:
    """The `embed-summary` table: one row."""
    m = out.metrics
    row = {"images": m.n_images, "valid": m.n_valid, "dim": m.dim, "skipped": len(m.skipped),
           "seconds": m.seconds, "store": out.artifact}
    if m.imported is not None:
        row |= {"imported": m.imported.path, "sha256": m.imported.sha256, "dtype": m.imported.dtype}
    return [row]


def transform_markdown(out: TransformOutput) -> str:
    """Held-out accuracy on the test fold (objects never fitted) with intervals, per level, beside
    both zero-shot protocols; the uncertainty agreement; the local-structure score; the
    hyper-parameters used (and every setting a search tried); the validation accuracy per epoch."""
    m = out.metrics
    h = m.heldout
    r = m.roles
    lines = [f"# Transform: test-fold accuracy {_est(h.zero_shot if h else None)} → {_est(h.transformed if h else None)}",
             "", f"Human data: {m.human_data}."]
    if m.objects is not None:
        lines += ["", *(f"    {line}" for line in m.objects.lines())]
    if r is not None and h is not None:
        lines += [f"Objects in {r.folds} folds: triplets {r.train} train, {r.val} validation (early stopping), "
                  f"{r.test} test on {h.n_objects} objects no fit saw; {r.dropped} dropped (objects in two roles).", "",
                  "| test fold (95% interval, objects resampled) | accuracy |", "|---|---|",
                  f"| zero-shot: {h.zero_shot_protocol} | {h.zero_shot.text()} |",
                  f"| zero-shot: {h.zero_shot_dot_protocol} | {h.zero_shot_dot.text()} |",
                  f"| transformed (dot products) | {h.transformed.text()} |",
                  f"| change vs the reference zero-shot | {h.gain.text()} |"]
        for level, f in (h.by_level or {}).items():
            lines.append(f"| level `{level}`: zero-shot → transformed | {f.zero_shot.text()} → {f.transformed.text()} "
                         f"({f.gain.text()}) |")
    if m.triplet_split is not None:
        lines += ["", f"Secondary ({m.triplet_split.label}): {m.triplet_split.zero_shot.text()} → "
                  f"{m.triplet_split.transformed.text()}."]
    if m.uncertainty is not None:
        u = m.uncertainty
        lines += ["", "| uncertainty vs the human probabilities (test fold) | T | NLL | JSD | entropy Spearman | ECE |",
                  "|---|---|---|---|---|---|"]
        for name, a, temp in (("zero-shot (cosine)", u.zero_shot, u.zero_shot_temperature),
                              ("transformed", u.transformed, u.transformed_temperature)):
            lines.append(f"| {name} | {temp:.3g} | {a.nll:.3f} | {a.jsd:.3f} | {a.entropy_spearman:.3f} | {a.ece:.3f} |")
    rows = [(f"local structure: {m.knn_k}-NN overlap before/after", f"{m.knn_overlap:.3f}"),
            ("soft targets", m.soft_targets or "n/a"),
            ("kept epoch / epochs run", f"{(m.best_epoch or 0) + 1} / {m.epochs_run}")]
    if m.vice is not None:
        rows.append((f"VICE accuracy on {m.vice.val_split} / dims", f"{_pct(m.vice.val_acc)} / {m.vice.dims}"))
    hp = m.hyperparameters.model_dump() if m.hyperparameters is not None else {}
    lines += ["", "| fit | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
              "Hyper-parameters used: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in hp.items())]
    if m.search is not None:
        best = m.search.best
        lines += ["", f"Search ({m.search.n_folds}-fold cross-validation over the training objects; selection "
                  f"scores, not held-out figures; chosen: alpha = {best['alpha']}, lam = {best['lam']}, "
                  f"lr = {best['lr']}):", "",
                  "| alpha | lam | lr | selection accuracy | k-NN overlap |", "|---|---|---|---|---|"]
        lines += [f"| {r.alpha} | {r.lam} | {r.lr} | {r.transformed_mean:.3f} | {r.knn_overlap_mean:.3f} |"
                  for r in m.search.settings]
    lines += _inline(transform_figures(out))
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
        f"Minimum cluster size {m.min_cluster_size}: "
        + (f"{len(m.reseeded)} smaller cluster(s) re-seeded ({', '.join(str(r['size']) for r in m.reseeded)} images)."
           if m.reseeded else "no cluster was smaller."),
        "",
        "| smallest | median | largest | empty |",
        "|---|---|---|---|",
        f"| {sizes.min()} | {int(np.median(sizes))} | {sizes.max()} | {int((sizes == 0).sum())} |",
        *_inline(cluster_figures(out)),
    ])


def dataset_location(url: str) -> tuple[str, str]:
    """(link, text) naming where a dataset is: for a local folder a `file://` URI of its absolute path and
    `host:/absolute/path` (a relative path opens nowhere, and a bare path does not say which machine);
    another fsspec URL as it is."""
    if "://" in url and not url.startswith("file://"):
        return url, url
    path = Path(url.removeprefix("file://")).resolve()
    return path.as_uri(), f"{socket.gethostname()}:{path}"


def dataset_rows(out: SampleOutput) -> list[dict[str, Any]]:
    """The `dataset-files` table: one row per published file, with the sha256 of the file (what `alignet
    datasets verify` checks) and of its arrays, and its location (last: the UI cuts long cells)."""
    rows = []
    for name, info in out.metrics.files.items():
        row = {"file": name, **info.model_dump(exclude={"path"})}
        row["location"] = dataset_location(store.join(out.metrics.publish_url, info.path))[1]
        rows.append(row)
    return rows


def _student_comparisons(out: DistillOutput) -> list[tuple[str, str, Comparison]]:
    """(short name, row name, comparison) of every held-out student figure."""
    m = out.metrics
    comps = [(s, f"triplets vs teacher: {s}", c) for s, c in m.heldout.items()]
    if m.human is not None:
        short = "human (PROXY)" if m.human_data and "proxy" in m.human_data else "human"
        comps.append((short, f"odd-one-out, test-fold objects ({m.human_data}, {m.n_human_test} triplets)", m.human))
    return comps


def student_markdown(out: DistillOutput) -> str:
    """The student's accuracies with intervals and paired changes, accuracy bars and loss curve."""
    m = out.metrics
    comps = _student_comparisons(out)
    lines = [
        f"# Student after {m.steps} steps on `{m.sampling}` ({m.n_train} training triplets)",
        "",
        "| held-out accuracy (95% interval) | before | after | change |",
        "|---|---|---|---|",
        *[_cmp_row(name, c) for _, name, c in comps],
        "",
        f"Before: {m.before_protocol}; with dot products instead: "
        + ", ".join(f"{s} {e.text()}" for s, e in m.heldout_before_dot.items())
        + ("" if m.human_before_dot is None else f", human {m.human_before_dot.text()}") + ".",
        "",
        f"Final loss {m.final_loss:.5f}; training {m.train_seconds:.1f} s, stage {m.seconds:.1f} s.",
        *_inline(student_figures(out)),
        "",
        f"Output: `{out.artifact}`",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- pictures
@dataclass(frozen=True)
class Figure:
    """One chart of a report: its file name under `figures/`, its alt text, and how to draw it (its PNG
    bytes, drawn when first asked for: a report folder that already holds the file does not redraw it)."""

    name: str
    alt: str
    draw: Callable[[], bytes]

    @functools.cached_property
    def png(self) -> bytes:
        return self.draw()


def transform_figures(out: TransformOutput) -> list[Figure]:
    """The validation-fold accuracy per epoch of the transform fit (none when it was off)."""
    curve = [h["val_acc"] for h in out.metrics.history if "val_acc" in h]
    if not curve:
        return []
    return [Figure(name="transform-fit.png", alt="validation accuracy per epoch",
                   draw=lambda: plots.curve_png({"validation-fold accuracy": curve}, "epoch", "accuracy",
                                                "transform fit"))]


def cluster_figures(out: ClusterOutput) -> list[Figure]:
    """The cluster-size distribution."""
    m = out.metrics
    return [Figure(name="cluster-sizes.png", alt="cluster sizes",
                   draw=lambda: plots.sizes_png(m.sizes, f"cluster sizes (k = {m.k})"))]


def student_figures(out: DistillOutput) -> list[Figure]:
    """The student's held-out accuracies before and after, and its loss curve."""
    comps = _student_comparisons(out)
    scores = {short: (c.before.value, c.after.value) for short, _, c in comps}
    return [Figure(name="student-accuracy.png", alt="student accuracy before and after",
                   draw=lambda: plots.before_after_png(scores, "student accuracy (held out)", chance=1 / 3)),
            Figure(name="student-loss.png", alt="loss curve",
                   draw=lambda: plots.loss_curve_png(out.metrics.loss_curve, "distillation loss"))]


def saliency_figures(out: EvaluateOutput) -> list[Figure]:
    """The side-by-side saliency picture the evaluation wrote, when it did."""
    name = out.metrics.saliency_picture
    url = store.join(out.dir, name) if name else None
    if url is None or not store.exists(url):
        return []

    def read() -> bytes:
        with fsspec.open(url, "rb") as f:
            return f.read()

    return [Figure(name="saliency.png", alt="image, map, saliency before, after", draw=read)]


def _inline(figures: list[Figure]) -> list[str]:
    """Markdown lines that embed each figure (a blank line before each): the Prefect artifacts' form."""
    return [line for f in figures for line in ("", plots.markdown_image(f.png, f.alt))]


def report_figures(outs: RunOutputs) -> list[Figure]:
    """Every chart the stage artifacts show, for `report.md`'s "Pictures" section."""
    figures = transform_figures(outs.transform) + cluster_figures(outs.cluster)
    if outs.distill is not None:
        figures += student_figures(outs.distill)
    if outs.evaluate is not None:
        figures += saliency_figures(outs.evaluate)
    return figures


def write_figures(folder: str, figures: list[Figure]) -> str:
    """Write each figure to `<folder>/figures/<name>` and return the markdown that shows them (relative links,
    so the report folder can be moved or copied as a whole). The folder is named by the last stage's content
    key, so a figure already there shows the same data: it is kept, not redrawn (a cached rerun's report)."""
    lines = ["## Pictures", ""]
    for f in figures:
        url = store.join(folder, "figures", f.name)
        if not store.exists(url):
            store.write_bytes_atomic(url, f.png)
        lines += [f"![{f.alt}](figures/{f.name})", ""]
    return "\n".join(lines)

"""What a run reports: `summarize` turns the stages' typed outputs into a `RunSummary` (written as
`summary.json`); `write_report` writes it and `report.md` under `<root>/reports/<dataset>/<last key>/`:
the run's table, then each stage's own section and figures (declared by the stage, in the registry's
order). Each stage's Prefect artifacts are rendered by its own `render.py`.
"""

from __future__ import annotations

import fsspec
from pydantic import create_model

from alignet_core.config import PipelineConfig
from alignet_core.distill.stage import no_pixels_reason
from alignet_core.embed.render import teacher_line
from alignet_core.embed.stage import SourceChanges
from alignet_core.evaluate.sets import DENSE_SET
from alignet_core.evaluate.stage import EvaluateMetrics
from alignet_core.io import store
from alignet_core.pipeline import registry
from alignet_core.runtime.render import Figure, cmp_row
from alignet_core.runtime.runner import Record, StageOutput
from alignet_core.sample.stage import DatasetFile
from alignet_core.stats.bootstrap import Comparison, Difference, Estimate
from alignet_core.transform.heldout import ExpectedFigures, HeldOut, RealFigures, TripletSplitFigures

#: the evaluate stage's sets of `human.densify` runs: VICE-labelled test-fold triplets and the real test-fold trials
PEOPLE_SET, REAL_SET = DENSE_SET, "human"
PEOPLE_MODELS = {"teacher_raw": "teacher, raw (cosine)", "teacher_aligned": "teacher, human-aligned transform",
                 "student_raw": "student, pretrained (cosine)", "student_aligned": "student, AligNet-distilled"}


class People(Record):
    """The headline of a run on human data (`human.densify`): every model on the test fold's objects, which no
    fit saw. expected[model]: expected accuracy against VICE fitted on every trial (a model of the people),
    with `ceiling` (VICE's own); real[model]: accuracy on the real trials whose three objects are test-fold
    objects (few); changes[side]: aligned − raw of the expected accuracy (object-clustered intervals)."""

    n_objects: int
    n_triplets: int
    ceiling: float | None
    expected: dict[str, Estimate]
    changes: dict[str, Difference]
    real: dict[str, Estimate]
    real_changes: dict[str, Difference]
    heldout: dict[str, str]  # model → whether its figures are held-out, in words


class _Outputs(Record):
    def stages(self) -> dict[str, StageOutput]:
        """The outputs of the stages that ran, in the registry's order."""
        return {s.name: out for s in registry.STAGES if (out := getattr(self, s.name)) is not None}


#: every stage output of one run, one field per registered stage (None: the stage did not run)
RunOutputs = create_model("RunOutputs", __base__=_Outputs,
                          **{s.name: (s.output_type() | None, None) for s in registry.STAGES})  # type: ignore[call-overload]

class RunSummary(Record):
    """The machine-readable summary of one pipeline run (`summary.json`).

    The headline is `alignment`: every model's accuracy at every abstraction level and on the
    held-out human (or proxy) triplets, object-disjoint, with 95% intervals, and the aligned − raw
    changes with paired intervals (`alignment_changes`). The point values of the earlier summary
    are kept (`transform_acc_*`: the zero-shot (cosine) and transformed accuracies on every fold's test
    triplets, each scored by the transform fitted without that fold, pooled;
    `student_*`), with their intervals beside them (`transform_heldout`, `student_heldout`,
    `student_human`). On the taxonomy proxy the student's test-fold figures are `student_proxy*` (with
    its noise ceiling) and `student_human*` are None: a proxy figure is never keyed `human`.
    `student_test_fold` says whether they are held-out (`human.teacher`)."""

    dataset: str
    dataset_version: str
    images: int = 0
    images_skipped: int = 0
    teacher: str = ""  # the timm model, or "imported: <path> (...)" for imported embeddings
    source_changes: SourceChanges | None = None  # a listed source: added/changed/removed since the previous store
    notes: list[str] = []  # stages not run and why (e.g. distillation without pixels)
    skipped_reasons: dict[str, int] = {}
    human_data: str | None
    people: People | None = None  # human.densify: the headline on people (see `People`)
    transform_expected: ExpectedFigures | None = None  # the same for the teacher, pooled over every fold
    transform_real: RealFigures | None = None
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
    student_human_acc_before: float | None  # on people's triplets only (None when the data are the proxy)
    student_human_acc_after: float | None
    student_human: Comparison | None
    student_proxy_acc_before: float | None = None  # the same on the taxonomy proxy's triplets (None on human data)
    student_proxy_acc_after: float | None = None
    student_proxy: Comparison | None = None
    student_proxy_ceiling: float | None = None  # the proxy's noise ceiling on those triplets
    student_test_fold: str | None = None  # whether the student's test-fold figure is held-out, in words
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
    proxy = d if d is not None and d.human_is_proxy else None
    human = d if d is not None and not d.human_is_proxy else None
    return RunSummary(
        dataset=outs.sample.artifact,
        dataset_version=s.version,
        images=outs.embed.metrics.n_images,
        images_skipped=len(outs.embed.metrics.skipped),
        skipped_reasons=outs.embed.metrics.skipped_reasons(),
        teacher=teacher_line(cfg, outs.embed),
        source_changes=outs.embed.metrics.changes,
        notes=run_notes(cfg, outs),
        human_data=t.human_data,
        people=_people(ev),
        transform_expected=t.expected,
        transform_real=t.real,
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
        student_human_acc_before=None if human is None else human.human_acc_before,
        student_human_acc_after=None if human is None else human.human_acc_after,
        student_human=None if human is None else human.human,
        student_proxy_acc_before=None if proxy is None else proxy.human_acc_before,
        student_proxy_acc_after=None if proxy is None else proxy.human_acc_after,
        student_proxy=None if proxy is None else proxy.human,
        student_proxy_ceiling=None if proxy is None else proxy.human_ceiling,
        student_test_fold=None if d is None else d.human_heldout,
        student_acc_before_by_sampling=None if d is None else d.acc_before,
        student_acc_after_by_sampling=None if d is None else d.acc_after,
        stage_seconds={name: o.metrics.seconds for name, o in outs.stages().items()},
        stage_keys={name: o.key for name, o in outs.stages().items()},
        report_dir=report_dir,
    )


def _people(ev: EvaluateMetrics | None) -> People | None:
    """The `People` headline from the evaluate stage's metrics, when it scored the dense test set."""
    if ev is None or PEOPLE_SET not in ev.sets:
        return None
    info = ev.sets[PEOPLE_SET]
    expected = {m: v[PEOPLE_SET] for m, v in ev.expected.items() if PEOPLE_SET in v}
    return People(n_objects=info.n_objects or 0,
                  n_triplets=info.n_triplets, ceiling=info.ceiling, expected=expected,
                  changes={side: v[PEOPLE_SET] for side, v in ev.expected_changes.items() if PEOPLE_SET in v},
                  real={m: v[REAL_SET] for m, v in ev.scores.items() if REAL_SET in v},
                  real_changes={side: v[REAL_SET] for side, v in ev.changes.items() if REAL_SET in v},
                  heldout=dict(ev.heldout))


def people_markdown(p: People) -> list[str]:
    """The report's first table on a run on human data: every model against the people, with intervals."""
    lines = [f"**Against the people** — the test fold's {p.n_objects} objects, which no fit saw: expected accuracy on "
             f"{p.n_triplets} triplets drawn inside the fold, labelled by VICE fitted on every human trial (a model of "
             f"the people; its own ceiling {'n/a' if p.ceiling is None else f'{100 * p.ceiling:.1f}%'}), and accuracy on "
             "the real trials whose three objects are test-fold objects (each person's own choice; few). 95% intervals, "
             "objects clustered.", "",
             "| model | expected accuracy vs the people | real trials | held-out |", "|---|---|---|---|"]
    for m, name in PEOPLE_MODELS.items():
        if m in p.expected:
            real = p.real.get(m)
            lines.append(f"| {name} | {p.expected[m].text()} | {'n/a' if real is None else real.text()} "
                         f"(n = {0 if real is None else real.n}) | {p.heldout.get(m, '')} |")
    for side, d in p.changes.items():
        real = p.real_changes.get(side)
        lines.append(f"| {side}: aligned − raw | {d.text()} | {'n/a' if real is None else real.text()} | |")
    return lines + [""]


def write_report(cfg: PipelineConfig, outs: RunOutputs) -> RunSummary:
    """Write `<root>/reports/<dataset>/<last key>/{report.md,summary.json}`; return the summary."""
    last = outs.evaluate or outs.distill or outs.sample
    folder = store.join(cfg.root, "reports", cfg.dataset_name, last.key)
    summary = summarize(cfg, outs, folder)
    store.write_json_atomic(store.join(folder, "summary.json"), summary.model_dump(mode="json"))
    text = run_markdown(summary)
    for name, out in outs.stages().items():
        if (section := registry.stage(name).report_section(out)) is not None:
            text += "\n" + section
    figures = report_figures(outs)
    if figures:
        text += "\n" + write_figures(folder, figures)
    with fsspec.open(store.join(folder, "report.md"), "w") as f:
        f.write(text)
    return summary


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
        *([] if s.people is None else people_markdown(s.people)),
        *([] if s.transform_expected is None else [
            f"Teacher against the people, every fold pooled ({s.transform_expected.n_objects} objects, each scored by "
            f"the transform whose VICE and fit never saw a trial naming it): expected accuracy "
            f"{s.transform_expected.zero_shot.text()} → {s.transform_expected.transformed.text()} "
            f"({s.transform_expected.gain.text()}); ceiling {100 * s.transform_expected.ceiling:.1f}%.", ""]),
        *([] if s.people is None else ["The figures below score the dense test triplets' sampled choices (a "
                                       "simulated participant) and the student against its teacher.", ""]),
        "| held-out accuracy (95% interval) | before | after | change |",
        "|---|---|---|---|",
        cmp_row(f"teacher, odd-one-out on held-out objects ({h.n_objects if h else 0} objects, each scored by the fit "
                f"that never saw it; {h.n_folds if h else 0} folds pooled)", teacher),
        cmp_row(f"student, triplet accuracy vs the teacher ({s.student_strategy})", s.student_heldout),
        cmp_row("student, odd-one-out on test-fold objects"
                + ("" if s.people is None or s.student_human is None else
                   f", the real trials inside the fold (n = {s.student_human.after.n})")
                + ("" if s.student_test_fold is None else f" ({s.student_test_fold})"), s.student_human)
        if s.student_proxy is None else
        cmp_row("student, odd-one-out on test-fold objects of the taxonomy PROXY"
                + ("" if s.student_proxy_ceiling is None else f" (noise ceiling {100 * s.student_proxy_ceiling:.1f}%)")
                + ("" if s.student_test_fold is None else f" ({s.student_test_fold})"), s.student_proxy),
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


def report_figures(outs: RunOutputs) -> list[Figure]:
    """Every chart the stage artifacts show, for `report.md`'s "Pictures" section, in stage order."""
    return [f for name, out in outs.stages().items() for f in registry.stage(name).report_figures(out)]


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

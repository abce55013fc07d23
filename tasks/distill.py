"""Task: finetune the student on official-format triplets and evaluate it (stage 4)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from alignet_core import plots

from alignet_core.io import store

from alignet_core.pipeline import stages
from alignet_core.config import PipelineConfig
from tasks._cache import cached_call


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def student_markdown(out: stages.StageOutput) -> str:
    """The student's accuracy table, accuracy bars and loss curve, as one markdown document."""
    m = out.metrics
    rows = [(s, f"triplets vs teacher: {s}", m["acc_before"][s], m["acc_after"][s]) for s in m["acc_after"]]
    if m.get("human_acc_after") is not None:
        rows.append(("human", f"human odd-one-out ({m['human_data']}, {m['n_human_test']} held out)",
                     m["human_acc_before"], m["human_acc_after"]))
    lines = [
        f"# Student after {m['steps']} steps on `{m['sampling']}` ({m['n_train']} training triplets)",
        "",
        "| held-out accuracy | before | after |",
        "|---|---|---|",
        *[f"| {name} | {_pct(b)} | {_pct(a)} |" for _, name, b, a in rows],
        "",
        f"Final loss {m['final_loss']:.5f}; training {m['train_seconds']:.1f} s, stage {m['seconds']:.1f} s.",
        "",
        plots.markdown_image(plots.before_after_png({short: (b, a) for short, _, b, a in rows},
                                                    "student accuracy (held out)", chance=1 / 3),
                             "student accuracy before and after"),
        "",
        plots.markdown_image(plots.loss_curve_png(m["loss_curve"], "distillation loss"), "loss curve"),
        "",
        f"Output: `{out.artifact}`",
    ]
    return "\n".join(lines) + "\n"


@task(name="distill", persist_result=True, retries=1, retry_delay_seconds=5)
def distill_task(cfg: PipelineConfig, ds: stages.StageOutput | None) -> stages.StageOutput:
    """Train the student with a progress artifact; publish its accuracy and loss curve."""
    total = cfg.distill.steps
    artifact_id = create_progress_artifact(progress=0.0, key="distill-progress", description="student training steps")
    every = max(1, total // 50)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == total:
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * step / total)

    out = stages.run_distill(cfg, ds, progress)
    update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    create_markdown_artifact(key="student-accuracy", markdown=student_markdown(out),
                             description="Student accuracy before and after distillation, and its loss curve")
    return out


def distill(cfg: PipelineConfig, ds: stages.StageOutput | None) -> stages.StageOutput:
    """Stage 4, cached on its content key: on `ds`, or on `distill.dataset` when set."""
    plan = stages.plan_distill(cfg, stages.distill_files(cfg, ds))
    return cached_call(distill_task, plan.key, store.is_complete(plan.dir), cfg, ds)

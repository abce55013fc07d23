"""How the distill stage shows its results: the `student-accuracy` markdown, accuracy bars and loss curve."""

from __future__ import annotations

from alignet_core import plots
from alignet_core.distill.stage import DistillOutput
from alignet_core.runtime.render import Figure, cmp_row, inline
from alignet_core.stats.bootstrap import Comparison


def _student_comparisons(out: DistillOutput) -> list[tuple[str, str, Comparison]]:
    """(short name, row name, comparison) of every held-out student figure."""
    m = out.metrics
    comps = [(s, f"triplets vs teacher: {s}", c) for s, c in m.heldout.items()]
    if m.human is not None:
        proxy = m.human_is_proxy or bool(m.human_data and "proxy" in m.human_data)
        ceiling = "" if m.human_ceiling is None else f"; noise ceiling {100 * m.human_ceiling:.1f}%"
        held = "" if m.human_heldout is None else f"; {m.human_heldout}"
        comps.append(("proxy" if proxy else "human",
                      f"odd-one-out, test-fold objects ({m.human_data}, {m.n_human_test} triplets{ceiling}{held})",
                      m.human))
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
        *[cmp_row(name, c) for _, name, c in comps],
        "",
        f"Before: {m.before_protocol}; with dot products instead: "
        + ", ".join(f"{s} {e.text()}" for s, e in m.heldout_before_dot.items())
        + ("" if m.human_before_dot is None else
           f", {'proxy' if m.human_is_proxy else 'human'} {m.human_before_dot.text()}") + ".",
        "",
        f"Final loss {m.final_loss:.5f}; training {m.train_seconds:.1f} s, stage {m.seconds:.1f} s.",
        *inline(student_figures(out)),
        "",
        f"Output: `{out.artifact}`",
    ]
    return "\n".join(lines) + "\n"


def student_figures(out: DistillOutput) -> list[Figure]:
    """The student's held-out accuracies before and after, and its loss curve."""
    comps = _student_comparisons(out)
    scores = {short: (c.before.value, c.after.value) for short, _, c in comps}
    return [Figure(name="student-accuracy.png", alt="student accuracy before and after",
                   draw=lambda: plots.before_after_png(scores, "student accuracy (held out)", chance=1 / 3)),
            Figure(name="student-loss.png", alt="loss curve",
                   draw=lambda: plots.loss_curve_png(out.metrics.loss_curve, "distillation loss"))]

"""How the evaluate stage shows its results: the `alignment-levels` and `saliency-alignment` markdown,
the report's alignment section and the saliency picture."""

from __future__ import annotations

import fsspec

from alignet_core.evaluate.stage import EvaluateOutput
from alignet_core.io import store
from alignet_core.runtime.render import Figure, est, inline


def alignment_markdown(out: EvaluateOutput) -> str:
    """The `alignment-levels` table: one row per model, one column per evaluation set (accuracy
    with its 95% interval), the aligned − raw changes, the paper's reference ranges and, where
    human choice probabilities exist, the uncertainty agreement."""
    m = out.metrics
    names = list(m.sets)
    lines = ["# Alignment by level of abstraction (held-out objects, 95% intervals)", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m.models[model]} | " + " | ".join(est(by_set.get(n)) for n in names) + " |"
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
        lines += inline(saliency_figures(out))
    return "\n".join(lines) + "\n"


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


def report_markdown(out: EvaluateOutput) -> str:
    """The evaluate stage's part of `report.md`: the alignment table and the saliency table (its picture
    goes with the report's figures)."""
    text = alignment_markdown(out)
    if out.metrics.saliency is not None:
        text += "\n" + saliency_markdown(out, picture=False)
    return text

"""How the evaluate stage shows its results: the `alignment-levels` and `saliency-alignment` markdown,
the report's alignment section and the saliency picture."""

from __future__ import annotations

import fsspec

from alignet_core.evaluate.stage import EvaluateOutput
from alignet_core.io import store
from alignet_core.runtime.render import Figure, est, inline


def alignment_markdown(out: EvaluateOutput) -> str:
    """The `alignment-levels` table: one row per model, one column per evaluation set (accuracy
    with its 95% interval), the aligned − raw changes, whether each model's figures are held-out, each
    set's ceiling, the AligNet paper's Levels figures beside file sets declared to hold that data (and
    nowhere else), the expected agreement with human choices on sets with response distributions and,
    where choice probabilities exist, the uncertainty agreement (human or the proxy's, named)."""
    m = out.metrics
    names = list(m.sets)
    lines = ["# Alignment on the evaluation sets (test-fold objects, 95% intervals)", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m.models[model]} | " + " | ".join(est(by_set.get(n)) for n in names) + " |"
              for model, by_set in m.scores.items()]
    ceilings = {n: i.ceiling for n, i in m.sets.items() if i.ceiling is not None}
    if ceilings:
        lines.append("| ceiling (best possible) | " + " | ".join(
            "" if n not in ceilings else f"{100 * ceilings[n]:.1f}%" for n in names) + " |")
    if m.changes:
        lines += ["", "| change, aligned − raw | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {side} | " + " | ".join(by_set[n].text() for n in names) + " |" for side, by_set in m.changes.items()]
    if m.heldout:
        lines += ["", "Held-out? " + "; ".join(f"{m.models.get(k, k)}: {v}" for k, v in m.heldout.items()) + "."]
    lines += ["", *[f"- `{n}` ({i.kind}, {i.n_triplets} triplets, intervals resample {i.resample}): {i.definition}"
                    for n, i in m.sets.items()]]
    proxy = [n for n, i in m.sets.items() if i.kind == "proxy"]
    if proxy:
        lines += ["", f"The `{proxy[0]}` column is the {m.human_data}: its figures say how well the models follow a "
                  "taxonomy, not people; the best possible is its noise ceiling, not 100%."]
    if any(i.kind == "level" for i in m.sets.values()):
        lines += ["", "The taxonomy sets have a taxonomy answer (ceiling 100%); they are not the AligNet paper's "
                  "human-judged Levels, and the paper's figures are not comparable with them."]
    if m.agreement:
        agreed = sorted({n for by_set in m.agreement.values() for n in by_set})
        lines += ["", "| expected agreement with human choices (95% interval) | " + " | ".join(agreed) + " |",
                  "|---|" + "---|" * len(agreed)]
        lines += [f"| {m.models[model]} | " + " | ".join(by_set[n].text() if n in by_set else "" for n in agreed)
                  + " |" for model, by_set in m.agreement.items()]
    if m.reference:
        lines += ["", *[f"For reference beside `{n}`: {v}." for n, v in m.reference.items()]]
    for kind, against in (("human", "human choice probabilities"), ("proxy", "the proxy's choice probabilities"),
                          ("file", "the file's human choice probabilities")):
        rows = [(model, n, u) for model, by_set in m.uncertainty.items() for n, u in by_set.items()
                if m.sets[n].kind == kind or (kind == "human" and m.sets[n].kind not in ("proxy", "file"))]
        if rows:
            lines += ["", f"| uncertainty vs {against} | set | T | NLL | JSD | entropy Spearman | ECE |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {m.models[model]} | {n} | {m.temperatures.get(model, float('nan')):.3g} | {u.nll:.3f} | "
                      f"{u.jsd:.3f} | {u.entropy_spearman:.3f} | {u.ece:.3f} |" for model, n, u in rows]
    if m.uncertainty:
        lines += ["", f"Temperatures: {m.temperature_rule}."]
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

"""How the transform stage shows its results: the `transform-accuracy` markdown and the fit curve."""

from __future__ import annotations

from alignet_core import plots
from alignet_core.runtime.render import Figure, est, fmt, inline, pct
from alignet_core.transform.stage import TransformOutput

ZERO_SHOT_NAME = "cosine similarity of the raw embeddings"


def transform_markdown(out: TransformOutput) -> str:
    """Held-out accuracy pooled over the folds of the rotation (each fold's test triplets scored by the
    transform fitted without that fold's objects) with intervals, per level, beside both zero-shot
    protocols; each fold's counts and accuracies; the secondary figures, labelled; the uncertainty
    agreement; which transform the store holds; the local-structure score; the hyper-parameters used
    (and every setting a search tried); the early-stopping accuracy per epoch."""
    m = out.metrics
    h = m.heldout
    r = m.rotation
    lines = [f"# Transform: held-out accuracy {est(h.zero_shot if h else None)} → {est(h.transformed if h else None)} "
             f"(pooled over {r.folds if r else '?'} folds)", "", f"Human data: {m.human_data}."]
    if m.objects is not None:
        lines += ["", *(f"    {line}" for line in m.objects.lines())]
    if m.expected is not None:
        e = m.expected
        lines += ["", f"**Against the people** (objects no fit saw; {e.label}):", "",
                  "| held-out, pooled over the folds (95% interval, objects clustered) | expected accuracy |",
                  "|---|---|",
                  f"| zero-shot: {ZERO_SHOT_NAME} | {e.zero_shot.text()} |",
                  f"| transformed (dot products) | {e.transformed.text()} |",
                  f"| change | {e.gain.text()} |",
                  f"| ceiling: VICE on every trial picks its own most likely odd one | {pct(e.ceiling)} |"]
    if m.real is not None:
        rl = m.real
        lines += ["", f"Real trials with all three objects in one held-out fold ({rl.transformed.n} trials over "
                  f"{rl.n_objects} objects; each person's own choice): zero-shot {rl.zero_shot.text()} → transformed "
                  f"{rl.transformed.text()} ({rl.gain.text()})."]
    if m.dense is not None:
        d = m.dense
        lines += ["", f"human.densify: VICE on the file's {d.n_trials} trials over {d.n_declared} objects, "
                  f"{d.train_per_fit} dense triplets per fit over the {d.n_objects} objects with images, {d.test_per_fold} "
                  f"test triplets per fold. Soft targets: {d.soft_targets}. Test labels: {d.test_labels}.", "",
                  "| VICE fit | trials | kept dims | epochs | stopped by the stability rule | seconds |",
                  "|---|---|---|---|---|---|",
                  *[f"| {f.fit} | {f.trials} | {f.dims} | {f.epochs_run} | {'yes' if f.converged else 'no'} | "
                    f"{f.seconds:g} |" for f in d.fits],
                  "", "The accuracy table below scores the dense test triplets' sampled choices (a simulated "
                  "participant drawn from VICE's probabilities); the expected accuracy above is the figure to read."]
    if r is not None and h is not None:
        lines += ["", f"Objects in {r.folds} folds, each held out once: a fold's transform trains on the triplets with "
                  f"no object in it (early stopping on a random {r.stop_per_fold} of those) and is scored on the "
                  f"triplets with all three objects in it. {r.test} test triplets over {h.n_objects} objects; each "
                  f"fold trains on {pct(r.train_share)} of the {r.n_triplets} triplets on average, {r.trained_on} "
                  f"train at least one fold; {r.partial} span two or three folds (they test no fold).", "",
                  f"| held-out, pooled over {h.n_folds} folds (95% interval, objects resampled) | accuracy |",
                  "|---|---|",
                  f"| zero-shot: {h.zero_shot_protocol} | {h.zero_shot.text()} |",
                  f"| zero-shot: {h.zero_shot_dot_protocol} | {h.zero_shot_dot.text()} |",
                  f"| transformed (dot products) | {h.transformed.text()} |",
                  f"| change vs the reference zero-shot | {h.gain.text()} |"]
        for level, f in (h.by_level or {}).items():
            lines.append(f"| level `{level}`: zero-shot → transformed | {f.zero_shot.text()} → {f.transformed.text()} "
                         f"({f.gain.text()}) |")
    if m.folds:
        lines += ["", "| fold | held-out objects | fitting / early-stopping triplets | test triplets | partial "
                  "(secondary) | zero-shot | transformed | kept epoch |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {f.fold}{' (store)' if m.teacher == 'heldout' and r is not None and f.fold == r.test_fold else ''} "
                  f"| {f.held_out_objects} | {f.fit_triplets} / {f.stop_triplets} | {f.test_triplets} | "
                  f"{f.partial_triplets} | {pct(f.zero_shot)} | {pct(f.transformed)} | {f.best_epoch + 1} |"
                  for f in m.folds]
    if m.partial is not None:
        p = m.partial
        lines += ["", f"Secondary ({p.label}): one object held out {p.one_object.zero_shot.text()} → "
                  f"{p.one_object.transformed.text()}; two objects held out {p.two_objects.zero_shot.text()} → "
                  f"{p.two_objects.transformed.text()}."]
    if m.triplet_split is not None:
        lines += ["", f"Secondary ({m.triplet_split.label}): {m.triplet_split.zero_shot.text()} → "
                  f"{m.triplet_split.transformed.text()}."]
    if m.teacher_fit is not None:
        lines += ["", f"The transformed store (what cluster, sample and distill read) holds {m.teacher_fit} "
                  f"(human.teacher: {m.teacher})."]
    if m.refit is not None:
        rf = m.refit
        lines += [f"Refit on all {rf.n_triplets} triplets: {rf.epochs} epochs ({rf.epochs_rule}), soft targets: "
                  f"{rf.soft_targets}; in-sample accuracy {pct(rf.train_acc)}."]
    if m.uncertainty is not None:
        u = m.uncertainty
        lines += ["", "| uncertainty vs the human probabilities (pooled test triplets) | T | NLL | JSD | entropy Spearman | ECE |",
                  "|---|---|---|---|---|---|"]
        for name, a, temp in (("zero-shot (cosine)", u.zero_shot, u.zero_shot_temperature),
                              ("transformed", u.transformed, u.transformed_temperature)):
            lines.append(f"| {name} | {temp:.3g} | {a.nll:.3f} | {a.jsd:.3f} | {a.entropy_spearman:.3f} | {a.ece:.3f} |")
    rows = [(f"local structure: {m.knn_k}-NN overlap before/after", f"{m.knn_overlap:.3f}"),
            ("soft targets", m.soft_targets or "n/a"),
            ("kept epoch / epochs run", f"{(m.best_epoch or 0) + 1} / {m.epochs_run}")]
    if m.vice is not None:
        rows.append((f"VICE accuracy on {m.vice.val_split} / dims", f"{pct(m.vice.val_acc)} / {m.vice.dims}"))
    hp = m.hyperparameters.model_dump() if m.hyperparameters is not None else {}
    lines += ["", "| the store's transform | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
              "Hyper-parameters used: " + ", ".join(f"{k} = {fmt(v)}" for k, v in hp.items())]
    if m.search is not None:
        best = m.search.best
        lines += ["", f"Search ({m.search.n_folds}-fold cross-validation over the training objects; selection "
                  f"scores, not held-out figures; chosen: alpha = {best['alpha']}, lam = {best['lam']}, "
                  f"lr = {best['lr']}):", "",
                  "| alpha | lam | lr | selection accuracy | its start (dot, standardized) | k-NN overlap |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.alpha} | {r.lam} | {r.lr} | {r.transformed_mean:.3f} | {r.zero_shot_dot_mean:.3f} | "
                  f"{r.knn_overlap_mean:.3f} |" for r in m.search.settings]
    lines += inline(transform_figures(out))
    return "\n".join(lines) + "\n"


def transform_figures(out: TransformOutput) -> list[Figure]:
    """The early-stopping accuracy per epoch of the store's transform fit (none when it was off)."""
    curve = [h["val_acc"] for h in out.metrics.history if "val_acc" in h]
    if not curve:
        return []
    return [Figure(name="transform-fit.png", alt="early-stopping accuracy per epoch",
                   draw=lambda: plots.curve_png({"early-stopping triplets' accuracy": curve}, "epoch", "accuracy",
                                                "transform fit"))]

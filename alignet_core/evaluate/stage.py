"""Stage 5, evaluate: the alignment of the teacher and the student, before and after, on three
taxonomy-answer sets (category_boundary, sibling_boundary, class_boundary: ceiling 100%), on the
held-out human (or proxy) triplets and on any given set — every figure with its 95% interval, every
before/after change with a paired one, and every model's figures labelled held-out or not
(`heldout`: under `human.teacher: all` the published teacher and its student saw every triplet).

In: the embed stage's store (the raw teacher), the transform stage's store (the aligned teacher),
and a student: the pipeline's own distillation output, or any folder given as `evaluate.student`
(the pretrained `distill.student` is the student's "before"). Out: `<dir>/alignment.json` (the
metrics) and the evaluation sets it used, as THINGS-format files under `<dir>/sets/`.

Protocols, named in the output: the raw models are scored by the reference zero-shot protocol
(gLocal: cosine similarity of their features); the aligned teacher by dot products of its
transformed embeddings (what the dataset's similarities are) and the AligNet student by dot
products of its head (what it was trained on). Where human choice probabilities exist, each
model's choice distribution is softmax(similarity / T), compared with the human one
(`evaluate.uncertainty`). T follows the transform report's rule (`transform.heldout`), one rule for
both: the aligned teacher at the T its transform was fitted at (`transform.temperature`), every other
model at the T `stats.uncertainty.fit_temperature` fits on the training objects' triplets.

The AligNet paper's Levels figures (agreement with human choices) are printed only beside a file set
declared to be that data (`evaluate.sets[].paper_level`, with its per-triplet response distributions):
there every model's expected agreement with a person's choice (the mean over triplets of the
probability people give the pair the model picks) is what compares. Taxonomy-answer sets never get them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.evaluate.saliency_scores import SaliencyAlignment
from alignet_core.evaluate.sets import EvalSet, build_sets, needed_images
from alignet_core.hardware import device_type, resolve_device
from alignet_core.human.data import DENSE_TEST_FILE, DENSE_TEST_PROBS, HumanData
from alignet_core.human.heldout import NOT_HELD_OUT_ALL
from alignet_core.human.triplets import object_embeddings
from alignet_core.io import embedding_store, formats, sources, store
from alignet_core.runtime.progress import ProgressLog
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage
from alignet_core.stats import bootstrap
from alignet_core.stats.bootstrap import Difference, Estimate, MeanEstimate
from alignet_core.stats.metrics import expected_agreement, odd_one_out_correct, pair_similarities, unit_rows
from alignet_core.stats.uncertainty import (
    UncertaintyAgreement,
    choice_distribution,
    fit_temperature,
    uncertainty_agreement,
)

if TYPE_CHECKING:
    import torch

# The modules that run the students (torch, timm) are imported inside the functions that use them:
# planning and reusing a finished stage (a cached rerun) must not pay for loading them.

log = logging.getLogger(__name__)

#: model → (how reports name it, the similarity it is scored by)
MODELS = {
    "teacher_raw": ("teacher, raw features", "cosine"),
    "teacher_aligned": ("teacher, human-aligned transform", "dot"),
    "student_raw": ("student, pretrained", "cosine"),
    "student_aligned": ("student, AligNet-distilled", "dot"),
}
#: the AligNet paper's figures on its human-judged Levels data (agreement with human choices, before →
#: after alignment), printed only beside a file set declared to hold that data (`evaluate.sets[].paper_level`)
REFERENCE = {
    "global": "36–57% → 66–69% (human-to-human reliability 61.9%)",
    "local": "46–58% → 59–63%",
    "class_boundary": "93–94% after (noise ceiling 89.2%)",
}
#: how the models' temperatures are chosen (the transform report's rule)
TEMPERATURE_RULE = ("aligned teacher: the T its transform was fitted at (transform.temperature); other models: T "
                    "fitted on the training objects' triplets (NLL of the observed choices, "
                    "stats.uncertainty.fit_temperature), as the transform report's zero-shot baseline")


class SetInfo(Record):
    kind: str
    n_triplets: int
    resample: str
    definition: str
    ceiling: float | None = None  # the best accuracy possible (1 for a taxonomy answer; the proxy's noise ceiling)
    n_objects: int | None = None  # distinct objects of a set over objects


class EvaluateMetrics(StageMetrics):
    """scores[model][set] (with intervals); changes['teacher' | 'student'][set] = aligned − raw,
    paired; uncertainty[model][set] where the set has human choice probabilities; agreement[model][set]
    (expected agreement with a person's choice) on file sets with response distributions; heldout[model]
    whether the model's test-fold figures are held-out (the sets' objects never reached its fit)."""

    sets: dict[str, SetInfo]
    models: dict[str, str]  # model → name and protocol
    scores: dict[str, dict[str, Estimate]]
    changes: dict[str, dict[str, Difference]]
    uncertainty: dict[str, dict[str, UncertaintyAgreement]]
    temperatures: dict[str, float]
    temperature_rule: str = TEMPERATURE_RULE
    reference: dict[str, str]  # set → the AligNet paper's Levels figure for it (file sets with paper_level only)
    agreement: dict[str, dict[str, MeanEstimate]] = {}  # model → set → expected agreement with human choices
    # human.densify: model → dense set → expected accuracy (object-clustered interval); side → its aligned − raw
    expected: dict[str, dict[str, Estimate]] = {}
    expected_changes: dict[str, dict[str, Difference]] = {}
    heldout: dict[str, str] = {}  # model → whether its test-fold figures are held-out, in words
    human_data: str | None
    saliency: SaliencyAlignment | None = None  # the "where" metric (evaluate.saliency_maps)
    saliency_picture: str | None = None  # its side-by-side PNG, beside alignment.json


class EvaluateOutput(StageOutput):
    metrics: EvaluateMetrics


def _student_identity(cfg: PipelineConfig, student: StageOutput | None) -> str | None:
    """The key of the student evaluated: the distill stage's, or a fingerprint of a given folder."""
    if cfg.evaluate.student is not None:
        files = [store.join(cfg.evaluate.student, f) for f in ("student.safetensors", "head.safetensors")]
        return store.content_key("student-files", [store.file_sha256(u) for u in files])
    return None if student is None else student.key


def _inputs(cfg: PipelineConfig, emb: StageOutput, tfm: StageOutput, student: StageOutput | None) -> list[str]:
    return [emb.key, tfm.key] + ([sid] if (sid := _student_identity(cfg, student)) else [])


def plan_evaluate(cfg: PipelineConfig, emb: StageOutput, tfm: StageOutput, student: StageOutput | None) -> StagePlan:
    """The evaluate stage's plan: its key covers the pixels the students embed (`sources.pixels_identity`)."""
    conf = {"evaluate": cfg.evaluate.key_dump(), "human": cfg.human.key_dump(), "seed": cfg.seed,
            "source": sources.pixels_identity(cfg.source), "student": cfg.distill.student,
            "weights": cfg.distill.weights, "image_size": cfg.distill.image_size,
            "device": device_type(cfg.device), **sources.labels_entry(cfg.source)}  # the taxonomy levels, the proxy
    return plan_stage(cfg.root, "evaluate", conf, _inputs(cfg, emb, tfm, student), __name__)


def run_evaluate(ctx: RunContext, emb: StageOutput, tfm: StageOutput, student: StageOutput | None) -> EvaluateOutput:
    """Score every model on every evaluation set (see the module doc)."""
    plan = ctx.plan(plan_evaluate, emb, tfm, student)
    return once(plan, EvaluateOutput, lambda: _evaluate(ctx, emb, tfm, student, plan), ctx.cfg.lock_timeout)


def _store_rows(url: str, rows: np.ndarray, n: int) -> np.ndarray:
    """(n, p) float32: the store's rows at `rows`, zeros elsewhere."""
    arr = embedding_store.open_embeddings(url)["embeddings"]
    out = np.zeros((n, arr.shape[1]), dtype=np.float32)
    out[rows] = embedding_store.gather_rows(arr, rows)
    return out


def _student_rows(model: torch.nn.Module, src: sources.ImageSource, rows: np.ndarray, device: torch.device,
                  use_head: bool, batch_size: int) -> np.ndarray:
    from alignet_core.models.embedding import embed_images

    emb = embed_images(model, [src.records[int(r)].path for r in rows], device, batch_size, use_head)
    out = np.zeros((len(src), emb.shape[1]), dtype=np.float32)
    out[rows] = emb
    return out


def _model_images(cfg: PipelineConfig, emb: StageOutput, tfm: StageOutput, student: StageOutput | None,
                  src: sources.ImageSource, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every model's (n, p) image embeddings at `rows` (zeros elsewhere)."""
    from alignet_core.models.student import build_student, load_student

    device = resolve_device(cfg.device)
    folder = cfg.evaluate.student or (None if student is None else student.artifact)
    models = ProgressLog("evaluate embed", "models", 2 if folder is None else 4)
    models.update(0, f" ({len(rows):,} images)")
    out = {"teacher_raw": _store_rows(emb.artifact, rows, len(src))}
    models.update(1)
    out["teacher_aligned"] = _store_rows(tfm.artifact, rows, len(src))
    models.update(2)
    if folder is not None:
        bs = cfg.evaluate.batch_size
        out["student_raw"] = _student_rows(build_student(cfg.distill, cfg.seed), src, rows, device, False, bs)
        models.update(3)
        out["student_aligned"] = _student_rows(load_student(folder, cfg.distill), src, rows, device, True, bs)
        models.update(4)
    return out


def _dense_test(tfm: StageOutput) -> tuple[np.ndarray, np.ndarray]:
    """The transform stage's dense test triplets and their VICE-on-every-trial probabilities (`human.densify`)."""
    t = formats.read_things_triplets(store.join(tfm.dir, DENSE_TEST_FILE))
    return t, formats.read_probabilities(store.join(tfm.dir, DENSE_TEST_PROBS), len(t))


def _similarities(e: np.ndarray, triplets: np.ndarray, similarity: str) -> np.ndarray:
    return pair_similarities(unit_rows(e) if similarity == "cosine" else e, triplets)


def _evaluate(ctx: RunContext, emb: StageOutput, tfm: StageOutput, student: StageOutput | None,
              plan: StagePlan) -> EvaluateOutput:
    t0 = time.perf_counter()
    cfg, src, data = ctx.cfg, ctx.source, ctx.human
    dense = data is not None and data.dense and cfg.transform.enabled  # densify's test set is the transform's
    sets = build_sets(cfg, src, data, _dense_test(tfm) if dense else None)
    fit_t = data is not None and data.probs is not None
    images = _model_images(cfg, emb, tfm, student, src, needed_images(sets, data, with_train_objects=fit_t))
    scores: dict[str, dict[str, Estimate]] = {m: {} for m in images}
    outcomes: dict[str, dict[str, np.ndarray]] = {m: {} for m in images}
    uncertainty: dict[str, dict[str, UncertaintyAgreement]] = {m: {} for m in images}
    temperatures: dict[str, float] = {}
    agreement: dict[str, dict[str, MeanEstimate]] = {}
    expected: dict[str, dict[str, np.ndarray]] = {}
    scored = ProgressLog("evaluate score", "models", len(images))
    scored.update(0, f" ({len(sets)} sets each)")
    for i, (model, e) in enumerate(images.items(), 1):
        similarity = MODELS[model][1]
        if fit_t:
            temperatures[model] = _temperature(cfg, model, e, data)  # type: ignore[arg-type]
        for s in sets:
            x, t = _set_embeddings(e, s, data)
            correct = odd_one_out_correct(x, t, similarity)
            outcomes[model][s.name] = correct
            scores[model][s.name] = bootstrap.accuracy(correct, cfg.seed, _unit(s))
            if s.kind == "file" and s.probs is not None:
                agreement.setdefault(model, {})[s.name] = bootstrap.mean_interval(
                    expected_agreement(_similarities(x, t, similarity), s.probs), cfg.seed)
            if s.kind == "dense" and s.probs is not None:
                expected.setdefault(model, {})[s.name] = expected_agreement(_similarities(x, t, similarity), s.probs)
            if s.probs is not None and model in temperatures:
                q = choice_distribution(_similarities(x, t, similarity), temperatures[model])
                uncertainty[model][s.name] = uncertainty_agreement(s.probs, q)
        scored.update(i)
    changes = {side: {s.name: bootstrap.paired_difference(outcomes[f"{side}_raw"][s.name],
                                                          outcomes[f"{side}_aligned"][s.name], cfg.seed, _unit(s))
                      for s in sets} for side in ("teacher", "student") if f"{side}_aligned" in images}
    dense_sets = [s for s in sets if s.kind == "dense"]
    expected_est = {m: {s.name: bootstrap.expected_accuracy(v[s.name], cfg.seed, s.triplets) for s in dense_sets}
                    for m, v in expected.items()}
    expected_changes = {side: {s.name: bootstrap.expected_change(expected[f"{side}_raw"][s.name],
                                                                 expected[f"{side}_aligned"][s.name], cfg.seed,
                                                                 s.triplets) for s in dense_sets}
                        for side in ("teacher", "student") if f"{side}_aligned" in expected}
    store.makedirs(plan.dir)
    saliency, picture = _where(cfg, src, student, needed_images(sets, data, with_train_objects=False), plan.dir)
    for s in sets:
        formats.write_things_triplets(store.join(plan.dir, "sets", f"{s.name}.txt"), s.triplets)
    metrics = EvaluateMetrics(
        sets={s.name: SetInfo(kind=s.kind, n_triplets=len(s.triplets), resample=s.resample, definition=s.definition,
                              ceiling=s.ceiling,
                              n_objects=len(np.unique(s.triplets)) if s.on_objects else None) for s in sets},
        models={m: f"{MODELS[m][0]} ({MODELS[m][1]})" for m in images},
        scores=scores, changes=changes, uncertainty=uncertainty, temperatures=temperatures,
        reference={s.name: f"the AligNet paper's Levels ({s.paper_level}), agreement with human choices: "
                   f"{REFERENCE[s.paper_level]}" for s in sets if s.paper_level in REFERENCE},
        agreement=agreement, expected=expected_est, expected_changes=expected_changes,
        heldout=heldout_labels(cfg, list(images), student),
        human_data=None if data is None else data.name(cfg),
        saliency=saliency, saliency_picture=picture,
        seconds=round(time.perf_counter() - t0, 2),
    )
    store.write_json_atomic(store.join(plan.dir, "alignment.json"), metrics.model_dump(mode="json"))
    for side, by_set in changes.items():
        log.info("evaluate: %s aligned − raw: %s", side, {k: d.text() for k, d in by_set.items()})
    return finish(plan, EvaluateOutput, store.join(plan.dir, "alignment.json"), metrics,
                  {"evaluate": cfg.evaluate.model_dump()}, _inputs(cfg, emb, tfm, student))


def _where(cfg: PipelineConfig, src: sources.ImageSource, student: StageOutput | None, test_rows: np.ndarray,
           out_dir: str) -> tuple[SaliencyAlignment | None, str | None]:
    """The "where" metric (`evaluate.saliency_maps`) on up to `evaluate.saliency_images` test-fold images, those
    in no training triplet of the pipeline's own student when there are any (`images` says which were used);
    its picture written to out_dir/saliency.png."""
    from alignet_core.evaluate.saliency import where_metric
    from alignet_core.io.dataset_splits import read_split
    from alignet_core.io.importance_maps import PROXY_NAME
    from alignet_core.models.student import build_student, load_student

    ev = cfg.evaluate
    folder = ev.student or (None if student is None else student.artifact)
    if ev.saliency_maps is None or folder is None:
        return None, None
    rows = np.asarray(test_rows, dtype=np.int64)
    metrics = None if student is None else student.metrics
    dataset, sampling = getattr(metrics, "dataset", None), getattr(metrics, "sampling", None)
    images = "test-fold images (the student's training triplets are unknown here: they may include these)"
    if ev.student is None and dataset and sampling:  # images the distillation trained on are not held out
        trained = read_split(store.join(dataset, f"train_{sampling}.npz"), src, cfg.distill.join).indices
        held = np.setdiff1d(rows, np.asarray(trained).ravel())
        if len(held):
            rows, images = held, "test-fold images in no training triplet of the student (held out)"
        else:
            images = ("test-fold images, every one also in the student's training triplets (not held out: a "
                      "harmonized student saw their maps)")
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(rows, min(len(rows), ev.saliency_images), replace=False)) if len(rows) else rows
    if not len(rows):
        return None, None
    name = PROXY_NAME if ev.saliency_maps == "proxy" else ev.saliency_maps
    result, png = where_metric(build_student(cfg.distill, cfg.seed), load_student(folder, cfg.distill), src, rows,
                               ev.saliency_maps, resolve_device(cfg.device), cfg.seed, name)
    result = result.model_copy(update={"images": images})
    if png is None:
        return result, None
    store.write_bytes_atomic(store.join(out_dir, "saliency.png"), png)
    return result, "saliency.png"


def _unit(s: EvalSet) -> np.ndarray | None:
    """The triplets whose items the bootstrap resamples (None: resample the triplets)."""
    return s.triplets if s.resample == "objects" else None


def _set_embeddings(e: np.ndarray, s: EvalSet, data: HumanData | None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, triplets) a set is scored on: the image rows, or its objects' mean embeddings
    with the triplets renumbered to them."""
    if not s.on_objects or data is None:
        return e, s.triplets
    objs = np.unique(s.triplets)
    img = np.flatnonzero(np.isin(data.object_of_image, objs))
    x = object_embeddings(e[img], np.searchsorted(objs, data.object_of_image[img]), len(objs))
    return x, np.searchsorted(objs, s.triplets)


def heldout_labels(cfg: PipelineConfig, models: list[str], student: StageOutput | None) -> dict[str, str]:
    """model → whether its figures on the test fold's sets are held-out, in words. The raw models fit
    nothing; the aligned teacher is held-out under `human.teacher: heldout` (its transform never saw a
    test-fold triplet) and not under `all`; the pipeline's student as its distill stage measured it (its
    training triplets against the test fold's images), a given student (`evaluate.student`) unknown."""
    out = {}
    for m in models:
        if m.endswith("_raw"):
            out[m] = "held-out (nothing fitted)"
        elif m == "teacher_aligned":
            out[m] = ("held-out (the transform never saw a test-fold triplet)" if cfg.human.teacher == "heldout"
                      else NOT_HELD_OUT_ALL)
        elif cfg.evaluate.student is not None:
            out[m] = "unknown (a given student: its training triplets are not known here)"
        else:
            label = getattr(None if student is None else student.metrics, "human_heldout", None)
            out[m] = label or (NOT_HELD_OUT_ALL if cfg.human.teacher == "all" else "unknown")
    return out


def _temperature(cfg: PipelineConfig, model: str, e: np.ndarray, data: HumanData) -> float:
    """T of softmax(similarity / T) for `model`, by the transform report's rule (`TEMPERATURE_RULE`): the
    aligned teacher's is the transform's own; every other model's fitted on the training objects' triplets."""
    if model == "teacher_aligned" and cfg.transform.enabled:
        return float(cfg.transform.temperature)
    return _fit_temperature(e, data, MODELS[model][1])


def _fit_temperature(e: np.ndarray, data: HumanData, similarity: str) -> float:
    """T of softmax(similarity / T) fitted on the training objects' triplets (observed choices)."""
    train = EvalSet(name="train", kind="human", triplets=data.triplets[data.split.train], probs=None,
                    on_objects=True, resample="objects", definition="")
    x, t = _set_embeddings(e, train, data)
    return fit_temperature(_similarities(x, t, similarity))

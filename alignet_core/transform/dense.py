"""The rotation's triplets under `human.densify`: VICE fitted once per fit on the file's trials, dense
soft-labelled triplets drawn from each; a content-keyed output of its own.

For fold f, VICE is fitted on every trial that names no object of fold f (declared objects without
images included: they carry the similarity structure), and the fold's transform trains on
`densify.n_triplets` triplets over the objects with images outside f, labelled by that VICE. The refit
(every object) trains on triplets labelled by VICE fitted on every trial. The test triplets of fold f
are `densify.n_test` triplets drawn inside f, labelled by VICE fitted on every trial: the model of the
people the held-out figures are scored against (expected accuracy; its own ceiling is the mean of each
row's largest probability). No fit sees them: fold f's VICE and transform never saw a trial naming an
object of f, and the test labels come from a model that is an evaluation target, not part of any fit.

All blocks live in one array (`DenseSets.triplets`: the test block, then each fit's training block), so
the rotation indexes rows as it does for a triplet file. The VICE fits are the cost (about 30 s each on
THINGS on 2 cores), so this is its own output, `<root>/stages/densify/<key>/`, keyed by the trial and map
files' content, the objects and their folds, `human.densify`, `vice`, the seed and the device (not by the
transform's settings: a transform search or a new `transform.lr` reuses it). Each VICE fit is saved as it
finishes, and a run killed mid-way resumes from the fits it saved.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from alignet_core.config import PipelineConfig
from alignet_core.hardware import device_type
from alignet_core.human.data import HumanData, human_files
from alignet_core.io import store
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage

if TYPE_CHECKING:
    import torch

    from alignet_core.human.vice import ViceModel

log = logging.getLogger(__name__)

FitKey = int | None  # a fold, or None for the refit on every object

SOFT_DENSE = ("VICE posterior predictive (human.densify): each fold's VICE fitted on every trial naming none of "
              "its objects, the refit's on every trial")
TEST_LABELS = ("VICE fitted on every trial (a model of the people; ceiling: mean over triplets of the largest "
               "choice probability)")
SETS_FILE = "dense.npz"


@dataclass(frozen=True)
class DenseSets:
    """triplets: (n, 3) int64 object ids (the run's objects with images), odd one sampled into column 2;
    probs: (n, 3) float32 VICE choice probabilities; test_rows: the test block (each row inside one fold);
    train_rows_of[key]: the rows fit `key` trains on."""

    triplets: np.ndarray
    probs: np.ndarray
    test_rows: np.ndarray
    train_rows_of: dict[FitKey, np.ndarray]


class DenseFit(Record):
    """One VICE fit of `human.densify`: what it saw and kept."""

    fit: str  # 'all' or 'fold <f>'
    trials: int  # trials it was fitted on (none naming an object of the fold)
    dims: int
    epochs_run: int
    converged: bool
    seconds: float


class DenseSummary(StageMetrics):
    """How `human.densify` made the rotation's triplets."""

    n_trials: int  # trials in the file
    n_declared: int  # objects VICE embeds
    n_objects: int  # objects with images (the dense triplets' objects)
    train_per_fit: int
    test_per_fold: int
    fits: list[DenseFit]
    soft_targets: str = SOFT_DENSE
    test_labels: str = TEST_LABELS


class DenseOutput(StageOutput):
    metrics: DenseSummary


def vice_seed(seed: int, key: FitKey) -> int:
    return seed if key is None else seed + 7919 * (key + 1)


def fit_keys(folds: int) -> list[FitKey]:
    """Every VICE fit of a run: VICE on every trial first (it labels the test triplets), then each fold's."""
    return [None, *range(folds)]


def _name(key: FitKey) -> str:
    return "all" if key is None else f"fold_{key}"


def excluded(data: HumanData, key: FitKey) -> np.ndarray | None:
    """Declared ids of the objects whose trials fit `key`'s VICE must not see (None: every trial)."""
    assert data.declared_of is not None
    return None if key is None else data.declared_of[data.fold_of == key]


def plan_dense(cfg: PipelineConfig, data: HumanData) -> StagePlan:
    """The content key of the dense sets (module doc)."""
    assert cfg.human.densify is not None and data.declared_of is not None
    objects = hashlib.sha256(np.ascontiguousarray(data.declared_of, np.int64).tobytes()
                             + np.ascontiguousarray(data.fold_of, np.int64).tobytes()).hexdigest()
    conf = {"files": {f: store.file_sha256(u) for f, u in sorted(human_files(cfg.human).items())},
            "objects": objects, "n_declared": data.n_declared, "densify": cfg.human.densify.key_dump(),
            "vice": cfg.vice.key_dump(), "seed": cfg.seed, "device": device_type(cfg.device)}
    return plan_stage(cfg.root, "densify", conf, [], __name__)


def run_dense(cfg: PipelineConfig, data: HumanData, device: torch.device) -> tuple[DenseSets, DenseSummary]:
    """The dense sets of the run: reused when complete, else made under the output's lock (module doc)."""
    plan = plan_dense(cfg, data)
    out = once(plan, DenseOutput, lambda: _make(cfg, data, device, plan), cfg.lock_timeout, clean=False)
    return read_sets(out.artifact), out.metrics


def read_sets(url: str) -> DenseSets:
    """The `DenseSets` saved at `url` (`SETS_FILE`)."""
    fs, path = store.url_to_fs(url)
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        keys = [k for k in z.files if k.startswith("train_")]
        rows = {None if k == "train_all" else int(k.removeprefix("train_fold_")): np.asarray(z[k]) for k in keys}
        return DenseSets(triplets=np.asarray(z["triplets"]), probs=np.asarray(z["probs"]),
                         test_rows=np.asarray(z["test_rows"]), train_rows_of=rows)


def _make(cfg: PipelineConfig, data: HumanData, device: torch.device, plan: StagePlan) -> DenseOutput:
    import io

    from alignet_core.human.densify import trials_without
    from alignet_core.human.vice import ViceModel, fit_vice

    assert data.trials is not None and cfg.human.densify is not None
    t0 = time.perf_counter()
    store.makedirs(plan.dir)
    folds = int(data.fold_of.max()) + 1
    models: dict[FitKey, ViceModel] = {}
    fits = []
    for key in fit_keys(folds):
        url = store.join(plan.dir, f"vice_{_name(key)}.safetensors")
        trials = trials_without(data.trials, excluded(data, key))
        if store.exists(url) and store.exists(f"{url}.json"):
            log.info("densify: VICE for %s loaded from the interrupted run's %s", _name(key), url)
            model = ViceModel.load(url)
        else:
            log.info("densify: VICE for %s on %d of %d trials", _name(key), len(trials), len(data.trials))
            model = fit_vice(trials, data.n_declared, cfg.vice, vice_seed(cfg.seed, key), device)
            model.save(url)
        models[key] = model
        info = model.info
        fits.append(DenseFit(fit="all" if key is None else f"fold {key}", trials=len(trials), dims=model.dim,
                             epochs_run=int(info.get("epochs_run", 0)), converged=bool(info.get("converged", False)),
                             seconds=round(float(info.get("seconds", 0.0)), 1)))
    sets = draw_sets(data, models, cfg.human.densify.n_triplets, cfg.human.densify.n_test, cfg.seed)
    buf = io.BytesIO()
    np.savez(buf, triplets=sets.triplets, probs=sets.probs, test_rows=sets.test_rows,
             **{f"train_{_name(k)}": v for k, v in sets.train_rows_of.items()})
    url = store.join(plan.dir, SETS_FILE)
    store.write_bytes_atomic(url, buf.getvalue())
    metrics = DenseSummary(seconds=round(time.perf_counter() - t0, 2), n_trials=len(data.trials),
                           n_declared=data.n_declared, n_objects=data.n_objects,
                           train_per_fit=cfg.human.densify.n_triplets, test_per_fold=cfg.human.densify.n_test,
                           fits=fits)
    return finish(plan, DenseOutput, url, metrics, {"densify": cfg.human.densify.model_dump(),
                                                    "vice": cfg.vice.model_dump()}, [])


def draw_sets(data: HumanData, models: dict[FitKey, ViceModel], n_triplets: int, n_test: int, seed: int) -> DenseSets:
    """The rotation's dense triplets from every fit's VICE (`models`, over the declared objects): each fold's
    test block drawn inside the fold and labelled by VICE on every trial, then each fit's training block
    over its training objects, labelled by its own VICE. Deterministic for a seed."""
    from alignet_core.human.densify import distinct_triples, labelled

    assert data.declared_of is not None
    folds = int(data.fold_of.max()) + 1
    decl = data.declared_of
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    for f in range(folds):
        rng = np.random.default_rng([seed, 53, f])
        t, p = labelled(models[None], decl[distinct_triples(np.flatnonzero(data.fold_of == f), n_test, rng)], rng, seed)
        blocks.append((np.searchsorted(decl, t), p))
    start = n_all_test = sum(len(b[0]) for b in blocks)
    train_rows_of: dict[FitKey, np.ndarray] = {}
    for key in [*range(folds), None]:
        rng = np.random.default_rng([seed, 59, 0 if key is None else key + 1])
        pool = np.arange(data.n_objects) if key is None else np.flatnonzero(data.fold_of != key)
        t, p = labelled(models[key], decl[distinct_triples(pool, n_triplets, rng)], rng, vice_seed(seed, key))
        blocks.append((np.searchsorted(decl, t), p))
        train_rows_of[key] = np.arange(start, start + len(t))
        start += len(t)
    return DenseSets(triplets=np.concatenate([b[0] for b in blocks]).astype(np.int64),
                     probs=np.concatenate([b[1] for b in blocks]).astype(np.float32),
                     test_rows=np.arange(n_all_test), train_rows_of=train_rows_of)

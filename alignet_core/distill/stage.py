"""Stage 4, distill: finetune a student with the AligNet loss on official-format triplets and
measure it before and after.

In: the dataset the sample stage published, or any folder of official-format files given as
`distill.dataset` (a published AligNet release, joined to the images by its `filenames` by
default; with `distill.join: indices` its filenames are still checked against those rows), plus the image source and the held-out human triplets. Out, in the
stage directory: `student.safetensors` (the backbone's timm state dict), `head.safetensors`,
`train_log.json` and the checkpoints training resumes from. Metrics: triplet accuracy against
the teacher on every `valid_*.npz`, and odd-one-out accuracy on the held-out human triplets (the
demo's proxy, named so), before and after.

Training runs in this process, or, with several `distill.devices`, on one rank per device started
by torchrun (`launch.train_on_ranks`; `distill.nodes` > 1: by torchrun on every node, docs/scaling.md). The
evaluations run once, here, on the first training device.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import fsspec

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.errors import ConfigError, InputError
from alignet_core.hardware import compute_identity
from alignet_core.human.data import human_test_split, trial_file
from alignet_core.human.heldout import heldout_label, noise_ceiling
from alignet_core.io import sources, store, version_locks
from alignet_core.io.formats import sampling_name
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage
from alignet_core.stats.bootstrap import Comparison, Estimate, accuracy, compare

# The modules that train (torch, timm) are imported inside the functions that use them: planning and
# reusing a finished stage (a cached rerun) must not pay for loading timm.

log = logging.getLogger(__name__)


class DistillFiles(Record):
    """The official-format files a distillation run reads."""

    folder: str
    sampling: str  # the training file's sampling name: train_<sampling>.npz
    train: str
    valid: dict[str, str]  # sampling name → valid_<sampling>.npz
    key: str  # identity of the input: the sampling stage's key, or a fingerprint of foreign files
    version: str | None = None  # the published version of the pipeline's own dataset (held while distilling)


class DistillMetrics(StageMetrics):
    """The student's held-out accuracies before and after training, and how training went.

    `heldout[sampling]` and `human` hold each figure with its 95% interval and the paired change
    (triplets resampled for the teacher's triplets; objects for the human ones, all from the test
    fold). "Before" is the pretrained backbone scored by the reference zero-shot protocol (cosine of
    its pooled features); the same with dot products is beside it (`*_before_dot`). "After" is the
    trained head's dot products, the similarity it was trained on. `acc_*` and `human_acc_*` repeat
    the point values. `human_heldout` says whether the test-fold figure is held-out: the student's
    training triplets hold no test-fold image (`human.teacher: heldout` makes the sampler leave them
    out) and its teacher never saw a test-fold triplet; under `human.teacher: all` it is labelled
    "not held-out (the published teacher saw every triplet)". Training has no validation, early
    stopping or fitted statistic: the steps and schedule are fixed by the config, and the `valid_*`
    files are scored only after training."""

    dataset: str
    sampling: str
    n_train: int
    acc_before: dict[str, float]
    acc_after: dict[str, float]
    human_acc_before: float | None
    human_acc_after: float | None
    heldout: dict[str, Comparison]
    heldout_before_dot: dict[str, Estimate]
    human: Comparison | None
    human_before_dot: Estimate | None
    human_data: str | None
    n_human_test: int
    human_heldout: str | None = None  # whether `human` is held-out: `human.heldout.heldout_label`
    human_is_proxy: bool = False  # `human` is on the taxonomy proxy's triplets: reports call it `proxy`
    human_ceiling: float | None = None  # the proxy's noise ceiling on the test triplets (`human.heldout.noise_ceiling`)
    steps: int
    final_loss: float
    loss_curve: list[float]
    train_seconds: float
    before_protocol: str = "cosine similarity of the pretrained backbone's pooled features (reference zero-shot)"


class DistillOutput(StageOutput):
    metrics: DistillMetrics


def distill_files(cfg: PipelineConfig, ds: StageOutput | None) -> DistillFiles:
    """Where the stage's triplets are: `distill.dataset` when set, else the published dataset `ds`."""
    d = cfg.distill
    if d.dataset is None and ds is None:
        raise ConfigError("distill.dataset: no dataset to train on; give a folder of AligNet .npz files "
                          "or run the sampling stage first")
    folder = d.dataset if d.dataset is not None else ds.artifact  # type: ignore[union-attr]
    name = d.sampling or sampling_name(d.strategy, cfg.cluster.k)
    train = store.join(folder, f"train_{name}.npz")
    fs, path = fsspec.core.url_to_fs(folder)
    if not store.exists(train):
        have = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/train_*.npz"))
        raise InputError(f"distill.dataset: {train!r} does not exist (found {have or 'no train_*.npz'}); "
                         "set distill.sampling or distill.strategy to one of the files")
    valid = {}
    for p in sorted(fs.glob(f"{path}/valid_*.npz")):
        base = p.rsplit("/", 1)[-1]
        valid[base[len("valid_"):-len(".npz")]] = store.join(folder, base)
    version = None
    if d.dataset is None:
        key = ds.key  # type: ignore[union-attr]
        version = getattr(ds.metrics, "version", None)  # type: ignore[union-attr]
    else:  # a foreign folder: its files' names, sizes and modification times
        ident = [(u, fs.size(fsspec.core.url_to_fs(u)[1]), fs.modified(fsspec.core.url_to_fs(u)[1]).timestamp())
                 for u in [train, *valid.values()]]
        key = store.content_key("distill-input", ident)
    return DistillFiles(folder=folder, sampling=name, train=train, valid=valid, key=key, version=version)


def plan_distill(cfg: PipelineConfig, files: DistillFiles) -> StagePlan:
    """The distill stage's plan. Its key: the `distill` section except `devices` and `nodes`, the seed,
    the image source (for imported embeddings, the listing of the joined images: `sources.pixels_identity`),
    the input's key, the compute identity of the training devices (kind and autocast
    dtype) and the rank count, nodes × devices. `distill.harmonize` enters the key when it is on.

    The rank count is part of the key, like `compile`: N ranks follow the one-process trajectory (same
    global batch, same schedule, same decay to init) only up to reduction order. Their gradients are
    averaged by an all-reduce that sums per-rank partial gradients, not one process's running sum over
    micro-batches, and their kernels run on other thread counts, so the weights differ in their last float
    bits (tests/distill/test_distill_ranks.py measures it). A key names the exact files under it, so a
    1-rank and a 2-rank run are two outputs, and a run killed on N ranks resumes on N ranks. Which
    devices of a kind (cuda:0,1 or cuda:2,3) changes nothing and is left out, as `embed.devices` is.
    """
    from alignet_core.distill.parallel import rank_layout

    layout = rank_layout(cfg)
    off = {"harmonize"} if cfg.distill.harmonize is None else set()  # keys of runs without it stay as they were
    conf = {"distill": cfg.distill.key_dump(exclude=off), "seed": cfg.seed,
            "source": sources.pixels_identity(cfg.source),
            "compute": dataclasses.asdict(compute_identity(layout.devices[0])), "ranks": layout.ranks}
    if trial_file(cfg.human) is None:  # its human test split is the taxonomy proxy's, drawn from the labels
        conf |= sources.labels_entry(cfg.source)
    return plan_stage(cfg.root, "distill", conf, [files.key], __name__)


def no_pixels_reason(cfg: PipelineConfig) -> str | None:
    """Why the student cannot be trained here: imported embeddings with no image source joined (a student
    learns from pixels); None when the source has images."""
    if sources.has_images(cfg.source):
        return None
    return (f"the rows are imported embeddings ({cfg.source.path}) with no image source joined, and a student "
            "learns from pixels; set source.images to the images the ids name (e.g. {kind: folder, path: ...}) to "
            "distill, or distill.enabled: false")


def distill_runs(cfg: PipelineConfig) -> bool:
    """Whether the pipeline's flow trains the student: `distill.enabled` and pixels to train on (a
    warning says why not when they are missing: `no_pixels_reason`)."""
    if not cfg.distill.enabled:
        return False
    if (reason := no_pixels_reason(cfg)) is not None:
        log.warning("distill: skipped: %s", reason)
        return False
    return True


def run_distill(
    ctx: RunContext,
    ds: StageOutput | None,
    progress: Callable[[int, float], None] | None = None,
) -> DistillOutput:
    """Finetune the student on official-format triplets (the pipeline's own, or `distill.dataset`);
    accuracies before and after. `progress(step, loss)` is called after every training step.

    The training devices are checked first (`parallel.rank_layout`): a bad `distill.devices` is a
    `ConfigError` before anything is read or written. With `distill.nodes` > 1 the training must have
    been run by torchrun on every node (docs/scaling.md); the stage then only evaluates it."""
    from alignet_core.distill.launch import nodes_need_torchrun
    from alignet_core.distill.parallel import rank_layout
    from alignet_core.models.student import read_train_log

    cfg = ctx.cfg
    if (reason := no_pixels_reason(cfg)) is not None:
        raise InputError(f"source.images: {reason}")
    layout = rank_layout(cfg)
    files = distill_files(cfg, ds)
    plan = ctx.plan(plan_distill, files)
    if layout.nodes > 1 and not store.is_complete(plan.dir) and read_train_log(plan.dir) is None:
        raise nodes_need_torchrun(layout)
    # training resumes from its own checkpoints: no temporaries to clear
    return once(plan, DistillOutput, lambda: _distill_held(ctx, files, plan, progress), cfg.lock_timeout, clean=False)


def _distill_held(
    ctx: RunContext, files: DistillFiles, plan: StagePlan, progress: Callable[[int, float], None] | None
) -> DistillOutput:
    """`_distill` while holding the published version it reads (the ranks read its files again): a
    retention by a concurrent regeneration (`keep_versions`) leaves it until training ends."""
    if files.version is None:
        return _distill(ctx, files, plan, progress)
    with version_locks.shared_hold(ctx.cfg.root, ctx.cfg.dataset_name, files.version):
        if not store.exists(files.train):
            raise InputError(f"distill: dataset {ctx.cfg.dataset_name!r} version {files.version!r} was removed by "
                             "retention (keep_versions) before training began; rerun to train on `latest`")
        return _distill(ctx, files, plan, progress)


def _distill(
    ctx: RunContext, files: DistillFiles, plan: StagePlan, progress: Callable[[int, float], None] | None
) -> DistillOutput:
    """The stage's work, under its lock (training resumes from its own checkpoints)."""
    from alignet_core.distill.evaluation import student_outcomes
    from alignet_core.distill.launch import train_on_ranks
    from alignet_core.distill.parallel import rank_layout
    from alignet_core.distill.train import train_student
    from alignet_core.io.dataset_splits import join_mode, read_split
    from alignet_core.models.student import build_student, load_student

    t0 = time.perf_counter()
    cfg, src = ctx.cfg, ctx.source
    layout = rank_layout(cfg)
    device = layout.devices[0]
    d = cfg.distill
    join = join_mode(d.dataset, d.join)
    train = read_split(files.train, src, join)
    valids = {name: read_split(url, src, join) for name, url in files.valid.items()}
    test = human_test_split(ctx.human)
    student = build_student(d, cfg.seed)  # "before": the pretrained backbone's own features
    before = student_outcomes(student, valids, test, src, device, False, d.n_eval, d.num_workers, ("cosine", "dot"))
    del student
    if layout.ranks == 1:
        log_ = train_student(train, src, d, plan.dir, device, cfg.seed, progress)
    else:  # one rank per device, started by torchrun; a finished run in plan.dir is returned as is
        log_ = train_on_ranks(cfg, files.train, plan.dir, progress)
    after = student_outcomes(load_student(plan.dir, d), valids, test, src, device, True, d.n_eval,
                             d.num_workers)["dot"]
    ref, dot = before["cosine"], before["dot"]
    heldout = {s: compare(ref.by_sampling[s], after.by_sampling[s], cfg.seed) for s in valids}
    human = None
    if test is not None:
        human = compare(ref.human, after.human, cfg.seed, triplets=test.triplets)
    metrics = DistillMetrics(
        dataset=files.folder,
        sampling=files.sampling,
        n_train=len(train),
        acc_before={s: c.before.value for s, c in heldout.items()},
        acc_after={s: c.after.value for s, c in heldout.items()},
        human_acc_before=None if human is None else human.before.value,
        human_acc_after=None if human is None else human.after.value,
        heldout=heldout,
        heldout_before_dot={s: accuracy(dot.by_sampling[s], cfg.seed) for s in valids},
        human=human,
        human_before_dot=None if test is None else accuracy(dot.human, cfg.seed, triplets=test.triplets),
        human_data=None if test is None else ctx.human.name(cfg),
        n_human_test=0 if test is None else int(len(test.triplets)),
        human_heldout=None if test is None else heldout_label(cfg, ctx.human, train.indices, d.dataset is None),
        human_is_proxy=test is not None and test.is_proxy,
        human_ceiling=noise_ceiling(test.probs) if test is not None and test.is_proxy else None,
        steps=log_["steps"],
        final_loss=log_["final_loss"],
        loss_curve=log_["loss_curve"],
        train_seconds=log_["seconds"],
        seconds=round(time.perf_counter() - t0, 2),
    )
    return finish(plan, DistillOutput, plan.dir, metrics, {"distill": d.model_dump()}, [files.key])

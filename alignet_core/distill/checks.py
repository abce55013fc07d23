"""The distill stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.distill.micro_batches import check_micro_batches
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import sources, store
from alignet_core.models.checks import check_model


def check(ctx: RunContext) -> None:
    """The student (name, weights, the blocks `train_blocks` trains), its dataset, and its training devices,
    when the run trains one (a run without pixels skips distillation, saying why); the student's name also
    when images are embedded (the evaluation builds the pretrained student)."""
    cfg, d = ctx.cfg, ctx.cfg.distill
    distills = d.enabled and sources.has_images(cfg.source)
    if distills:
        check_model("distill", d.student, d.weights, "distill.student")
    elif cfg.source.kind != "embeddings":
        from alignet_core.models.refs import check_model_name

        check_model_name(d.student, "distill.student")
    if not distills:
        return
    if d.train_blocks is not None:
        from alignet_core.models.partial import check_train_blocks

        check_train_blocks(d.student, d.train_blocks)
    if d.dataset is not None and not store.exists(d.dataset):
        raise InputError(f"distill.dataset: folder {d.dataset!r} does not exist")
    if d.dataset is None and d.strategy not in cfg.sample.strategies:
        raise ConfigError(f"distill.strategy: {d.strategy!r} must be one of sample.strategies "
                          f"{list(cfg.sample.strategies)}")
    if any(s.startswith("cuda") for s in d.devices or [cfg.device]):  # the devices exist, the batch divides
        from alignet_core.distill.parallel import rank_layout

        rank_layout(cfg)
    else:
        check_micro_batches(d.batch_triplets, d.grad_accum, len(d.devices or [cfg.device]) * d.nodes, d.nodes)

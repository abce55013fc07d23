"""The evaluate stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.context import RunContext
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import formats, sources, store


def check(ctx: RunContext) -> None:
    """A given student is a distillation output with pixels to score it on; every evaluation set's files
    exist and read."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    if not e.enabled:
        return
    if e.student is not None and not sources.has_images(cfg.source):
        raise ConfigError("evaluate.student: scoring a student needs pixels, and the source is imported embeddings "
                          "with no image source joined; set source.images or leave evaluate.student unset")
    if e.student is not None:
        missing = [f for f in ("student.safetensors", "head.safetensors", "train_log.json")
                   if not store.exists(store.join(e.student, f))]
        if missing:
            raise InputError(f"evaluate.student: {e.student!r} is not a distillation output folder (missing "
                             f"{missing}); give the folder a distill run wrote")
    for i, s in enumerate(e.sets):
        for field in ("triplets", "probabilities"):
            path = getattr(s, field)
            if path is not None and not store.exists(path):
                raise InputError(f"evaluate.sets[{i}].{field}: file {path!r} does not exist")
        try:
            trip = formats.read_things_triplets(s.triplets, len(ctx.source))
            if s.probabilities:
                formats.read_probabilities(s.probabilities, len(trip))
        except InputError as err:
            raise InputError(f"evaluate.sets[{i}] ({s.name}): {err}") from None

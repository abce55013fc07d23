"""Preflight: everything about a run that can be checked before any work starts.

Bad configs and inputs fail here, in seconds, with a message naming the field or path and what is
expected, instead of after hours of embedding. What the run reads (an imported array, the source's
listing, the human data's files and a triplet file) is checked here; each stage's own settings by the
stage (`<stage>/checks.py`, declared in the registry), in the pipeline's order. torch and timm are
imported only by the checks that need them (a named CUDA device, `embed.layers`), so `alignet validate`
answers in about a second on a CPU config.
"""

from __future__ import annotations

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.errors import ConfigError, InputError
from alignet_core.io import store
from alignet_core.pipeline import registry


def preflight(cfg: PipelineConfig) -> RunContext:
    """Check what can be checked before any work (inputs exist, names resolve, sizes fit) and return the
    run's context, built on the way: the source listed once, a triplet file read and split once.

    Raises `ConfigError` / `InputError` naming the field or path and what is expected."""
    if cfg.source.kind == "embeddings":
        _check_imported(cfg)
    ctx = RunContext.of(cfg)
    ctx.source  # noqa: B018 - listed now (timed by the context: the listing is the source's identity)
    if cfg.device == "cuda":
        from alignet_core.hardware import resolve_device

        resolve_device(cfg.device)
    _check_human_files(cfg)
    for stage in registry.STAGES:
        stage.preflight(ctx)
    _read_human_data(ctx)
    return ctx


def _check_imported(cfg: PipelineConfig) -> None:
    """Imported embeddings: the array, its ids and labels pass `inspect_embeddings` (numpy, h5py or zarr
    only; torch for a .pt file), the store's dtype can hold them, and no extraction setting is asked for."""
    from alignet_core.io import embedding_sources

    if cfg.embed.layers:
        raise ConfigError("embed.layers: intermediate layers come from extraction; imported embeddings "
                          "(source.kind 'embeddings') have none; leave embed.layers empty")
    info = embedding_sources.inspect_embeddings(cfg.source)
    embedding_sources.check_store_dtype(info, cfg.embed.store_dtype)


def _check_human_files(cfg: PipelineConfig) -> None:
    """The human data's files exist, and probabilities come with their triplets."""
    h = cfg.human
    for field in ("triplets", "probabilities", "objects", "concepts"):
        path = getattr(h, field)
        if path is not None and not store.exists(path):
            raise InputError(f"human.{field}: file {path!r} does not exist")
    if h.probabilities and not h.triplets:
        raise ConfigError("human.probabilities: given without human.triplets")


def _read_human_data(ctx: RunContext) -> None:
    """A triplet file is read, checked and split now, not after hours of embedding (the context keeps it
    for the run); an error names the `human.*` field."""
    h = ctx.cfg.human
    if h.triplets is None and h.shipped is None:
        return
    try:
        ctx.human  # noqa: B018 - read now
    except InputError as err:
        if str(err).startswith("human."):
            raise
        field = next((f for f in ("probabilities",) if getattr(h, f) and getattr(h, f) in str(err)), "triplets")
        raise InputError(f"human.{field}: {err}") from None


def check_inputs(ctx: RunContext, stage: str, inputs: list) -> None:
    """Before `stage` runs: every store it reads (its inputs' Zarr artifacts, e.g. `embeddings.zarr`) holds the
    images of the run's one listing, in order (`sources.check_same_images`: a one-line `InputError` naming the
    stage and the counts otherwise)."""
    from alignet_core.io.sources import check_same_images

    listed = ctx.cfg.source.kind in ("folder", "filelist", "tar")
    for out in inputs:
        artifact = getattr(out, "artifact", "")
        if isinstance(artifact, str) and artifact.rstrip("/").endswith(".zarr"):
            check_same_images(stage, artifact, ctx.source, ctx.listing.key if listed else None)

"""Preflight: everything about a run that can be checked before any work starts.

Bad configs and inputs fail here, in seconds, with a message naming the field or path and what is
expected, instead of after hours of embedding. torch and timm are imported only by the checks that need
them (a named CUDA device, `embed.layers`), so `alignet validate` answers in about a
second on a CPU config.
"""

from __future__ import annotations

from alignet_core.config import PipelineConfig
from alignet_core.config.base import device_list_problem
from alignet_core.context import RunContext
from alignet_core.distill.micro_batches import check_micro_batches
from alignet_core.errors import ConfigError, InputError
from alignet_core.human.data import no_human_data_message, proxy_taxonomy
from alignet_core.io import formats, sources, store
from alignet_core.models.refs import check_model_name, resolve_weights


def preflight(cfg: PipelineConfig) -> RunContext:
    """Check what can be checked before any work (inputs exist, names resolve, sizes fit) and return the
    run's context, built on the way: the source listed once, the human data read and split once.

    Raises `ConfigError` / `InputError` naming the field or path and what is expected."""
    imported = cfg.source.kind == "embeddings"
    if imported:
        _check_imported(cfg)
    src = sources.source_from_config(cfg.source)
    n = len(src)
    distills = cfg.distill.enabled and sources.has_images(cfg.source)  # else the flow skips it, saying why
    if cfg.embed.devices is not None and not imported:
        _check_devices(cfg.embed.devices, "embed.devices")
    for field, name, needed in (("embed.model", cfg.embed.model, not imported),
                                ("distill.student", cfg.distill.student, distills or not imported)):
        if needed:
            check_model_name(name, field)
    for section, name, weights, needed in (("embed", cfg.embed.model, cfg.embed.weights, not imported),
                                           ("distill", cfg.distill.student, cfg.distill.weights, distills)):
        try:
            if needed:
                resolve_weights(name, weights)
        except InputError as err:  # "weights: ..." → "embed.weights: ...", naming the section
            raise InputError(f"{section}.{err}" if str(err).startswith("weights:") else str(err)) from None
    if distills:
        if cfg.distill.dataset is not None and not store.exists(cfg.distill.dataset):
            raise InputError(f"distill.dataset: folder {cfg.distill.dataset!r} does not exist")
        if cfg.distill.dataset is None and cfg.distill.strategy not in cfg.sample.strategies:
            raise ConfigError(f"distill.strategy: {cfg.distill.strategy!r} must be one of sample.strategies "
                              f"{list(cfg.sample.strategies)}")
    if cfg.cluster.k > n:
        raise ConfigError(f"cluster.k: {cfg.cluster.k} clusters for {n} images; k must be at most the number of images")
    h = cfg.human
    for field in ("triplets", "probabilities", "objects", "concepts"):
        path = getattr(h, field)
        if path is not None and not store.exists(path):
            raise InputError(f"human.{field}: file {path!r} does not exist")
    if h.probabilities and not h.triplets:
        raise ConfigError("human.probabilities: given without human.triplets")
    if h.triplets is None and cfg.transform.enabled and proxy_taxonomy(cfg, src) is None:
        raise ConfigError(no_human_data_message(src))
    if len(set(cfg.sample.strategies)) != len(cfg.sample.strategies):
        raise ConfigError(f"sample.strategies: duplicates in {list(cfg.sample.strategies)}")
    if cfg.device == "cuda":
        from alignet_core.hardware import resolve_device

        resolve_device(cfg.device)
    if cfg.embed.layers:
        import timm
        import torch

        with torch.device("meta"):  # the module tree only: no weights, no memory
            names = {name for name, _ in timm.create_model(cfg.embed.model, pretrained=False).named_modules()}
        unknown = [name for name in cfg.embed.layers if name not in names or not name]
        if unknown:
            raise ConfigError(f"embed.layers: {unknown} are not modules of {cfg.embed.model!r}; expected names "
                              "as in model.named_modules(), e.g. 'blocks.3'")
    if distills:  # the training devices exist, and ranks × grad_accum cut the batch evenly
        d = cfg.distill
        if any(s.startswith("cuda") for s in d.devices or [cfg.device]):
            from alignet_core.distill.parallel import rank_layout

            rank_layout(cfg)
        else:
            check_micro_batches(d.batch_triplets, d.grad_accum, len(d.devices or [cfg.device]) * d.nodes, d.nodes)
    ctx = RunContext.of(cfg, src)
    try:  # a triplet file is read, checked and split now, not after hours of embedding: once for the run
        if h.triplets is not None:
            ctx.human  # noqa: B018 - read now (the context keeps it)
    except InputError as err:
        if str(err).startswith("human."):
            raise
        field = next((f for f in ("probabilities",) if getattr(h, f) and getattr(h, f) in str(err)), "triplets")
        raise InputError(f"human.{field}: {err}") from None
    e = cfg.evaluate
    if e.enabled and e.student is not None and not sources.has_images(cfg.source):
        raise ConfigError("evaluate.student: scoring a student needs pixels, and the source is imported embeddings "
                          "with no image source joined; set source.images or leave evaluate.student unset")
    if e.enabled and e.student is not None:
        missing = [f for f in ("student.safetensors", "head.safetensors", "train_log.json")
                   if not store.exists(store.join(e.student, f))]
        if missing:
            raise InputError(f"evaluate.student: {e.student!r} is not a distillation output folder (missing "
                             f"{missing}); give the folder a distill run wrote")
    for i, s in enumerate(e.sets if e.enabled else []):
        for field in ("triplets", "probabilities"):
            path = getattr(s, field)
            if path is not None and not store.exists(path):
                raise InputError(f"evaluate.sets[{i}].{field}: file {path!r} does not exist")
        try:
            trip = formats.read_things_triplets(s.triplets, n)
            if s.probabilities:
                formats.read_probabilities(s.probabilities, len(trip))
        except InputError as err:
            raise InputError(f"evaluate.sets[{i}] ({s.name}): {err}") from None
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


def _check_devices(settings: list[str], field: str) -> None:
    """A device list's strings here; whether its GPUs exist only when it names one (that needs torch)."""
    if any(isinstance(s, str) and s.startswith("cuda") for s in settings):
        from alignet_core.hardware import resolve_devices

        resolve_devices(settings, field)
    elif problem := device_list_problem(settings):
        raise ConfigError(f"{field}: {problem}")

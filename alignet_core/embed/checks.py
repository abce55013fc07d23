"""The embed stage's checks before any work (`pipeline.preflight` runs them for every run)."""

from __future__ import annotations

from alignet_core.config.base import device_list_problem
from alignet_core.context import RunContext
from alignet_core.errors import ConfigError
from alignet_core.models.checks import check_model


def check(ctx: RunContext) -> None:
    """The teacher (its name, weights and `embed.layers`) and `embed.devices`, when images are embedded
    (imported embeddings have no teacher: the import's own checks run first)."""
    cfg = ctx.cfg
    if cfg.source.kind == "embeddings":
        return
    if cfg.embed.devices is not None:
        check_devices(cfg.embed.devices, "embed.devices")
    check_model("embed", cfg.embed.model, cfg.embed.weights, "embed.model")
    if cfg.embed.layers:
        import timm
        import torch

        with torch.device("meta"):  # the module tree only: no weights, no memory
            names = {name for name, _ in timm.create_model(cfg.embed.model, pretrained=False).named_modules()}
        unknown = [name for name in cfg.embed.layers if name not in names or not name]
        if unknown:
            raise ConfigError(f"embed.layers: {unknown} are not modules of {cfg.embed.model!r}; expected names "
                              "as in model.named_modules(), e.g. 'blocks.3'")


def check_devices(settings: list[str], field: str) -> None:
    """A device list's strings here; whether its GPUs exist only when it names one (that needs torch)."""
    if any(isinstance(s, str) and s.startswith("cuda") for s in settings):
        from alignet_core.hardware import resolve_devices

        resolve_devices(settings, field)
    elif problem := device_list_problem(settings):
        raise ConfigError(f"{field}: {problem}")

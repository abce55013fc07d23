"""Extra layers captured in the extraction's forward pass: forward hooks on named timm modules,
globally average-pooled ((b, c, h, w) → (b, c); token outputs (b, t, d) → (b, d)), written as
`layers/<name>` (n, c) arrays of the store chunk by chunk with the embeddings, so they resume alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from alignet_core.config.embed import EmbedConfig
from alignet_core.errors import InputError, StoreError
from alignet_core.models.factory import data_config, pooled_features

LAYERS_GROUP = "layers"


def _global_pool(out: Any, name: str) -> torch.Tensor:
    """A hooked module's output → (b, c): mean over (h, w) of (b, c, h, w), over tokens of (b, t, d)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"embed.layers: module {name!r} returns {type(out).__name__}, not a tensor")
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out.mean(dim=1)
    if out.ndim == 2:
        return out
    raise InputError(f"embed.layers: module {name!r} returns a tensor of shape {tuple(out.shape)}; expected 2-4 dims")


class LayerCapture:
    """Forward hooks that keep the pooled output (b, c) of named modules from the latest forward pass.

    Use as a context manager; the hooks are removed on exit. `outputs[name]` is (b, c) in the forward's dtype.
    """

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(n, list(modules), n=3, cutoff=0.5) for n in unknown}
            raise InputError(
                f"embed.layers: {unknown} are not modules of {type(model).__name__}; close matches: {hints} "
                "(names as in model.named_modules())"
            )
        self.names = list(names)
        self.modules = [modules[n] for n in names]
        # keys fixed up front: torch.compile guards on this dict, so filling it later would recompile once
        self.outputs: dict[str, torch.Tensor] = {n: torch.empty(0) for n in self.names}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: Any, out: Any) -> None:
            self.outputs[name] = _global_pool(out, name)

        return hook


def layer_dims(model: torch.nn.Module, names: list[str], device: torch.device) -> dict[str, int]:
    """Width c of each named layer's pooled output, from one forward pass of a zero image at the model's input size."""
    if not names:
        return {}
    _, h, w = data_config(model)["input_size"]
    x = torch.zeros(1, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    with LayerCapture(model, names) as cap, torch.inference_mode():
        pooled_features(model, x)
    return {n: int(cap.outputs[n].shape[1]) for n in names}


def layer_arrays(g: Any, url: str, cfg: EmbedConfig, dims: dict[str, int], n: int) -> dict[str, Any]:
    """The `layers/<name>` (n, c) arrays of the store, created on first use; checked on resume."""
    if list(g.attrs.get("layers", [])) != list(cfg.layers):
        raise StoreError(
            f"{url!r} was written with embed.layers={list(g.attrs.get('layers', []))}, not {list(cfg.layers)}; "
            "remove it or use a new key"
        )
    if not dims:
        return {}
    grp = g.require_group(LAYERS_GROUP)
    out = {}
    for name, c in dims.items():
        if name in grp:
            arr = grp[name]
            if arr.shape != (n, c) or str(arr.dtype) != cfg.store_dtype:
                raise StoreError(f"{url!r}: {LAYERS_GROUP}/{name} exists with another shape/dtype; remove it")
        else:
            arr = grp.create_array(name, shape=(n, c), dtype=cfg.store_dtype, chunks=(cfg.chunk_rows, c), fill_value=0)
        out[name] = arr
    return out

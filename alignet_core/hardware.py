"""The one place that picks hardware: torch device, autocast dtype, FAISS GPU or CPU."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from alignet_core.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str) -> "torch.device":
    """'auto' → cuda when available else cpu; 'cuda' without a GPU is an error, never a silent fallback."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if setting not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {setting!r}")
    return torch.device(setting)


def autocast_dtype(device: "torch.device") -> "torch.dtype | None":
    """bf16 autocast on GPUs that support it; full float32 on CPU (where bf16 is slower)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def faiss_gpu_available(setting: str = "auto") -> bool:
    """True when FAISS was built with GPU support, sees a GPU, and the config allows it."""
    if setting == "never":
        return False
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return n > 0


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic torch kernels inside the block (restored after), so that a fit gives
    bit-identical weights run after run: multithreaded CPU index-add backward otherwise sums
    in a varying order."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)

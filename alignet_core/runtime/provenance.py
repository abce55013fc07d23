"""What made an output: the machine and the library versions, written into each published dataset's
manifest, because the reproducibility contract (docs/reproducibility.md) promises identical bytes only for
the same inputs on the same machine, kernels and thread count."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

#: the libraries whose versions can change a stage's numbers
LIBRARIES = ("numpy", "torch", "torchvision", "timm", "faiss-cpu", "zarr", "dask", "distributed", "prefect")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def made_on() -> dict[str, Any]:
    """The machine (CPU model, usable cores, platform), torch's CPU kernel level and thread count, and the
    versions of the libraries that compute the outputs."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "libraries": {name: _installed(name) for name in LIBRARIES},
    }

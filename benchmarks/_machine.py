"""Machine description stored with every benchmark result (CPU, cores, RAM, load, versions)."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from alignet_core.runtime.provenance import cpu_model

if TYPE_CHECKING:  # torch is imported by the GPU benchmarks only, never here
    import argparse

    import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: results measured on a GPU (`make gpu-check`; never CPU numbers)
RESULTS_GPU = RESULTS / "gpu"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None)


# peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's datasheets, by device-name pattern
PEAK_BF16_DENSE: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200(?!.*NVL)", 989e12),
    (r"A100", 312e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name (torch.cuda.get_device_name), None when not in the table."""
    return next((peak for pattern, peak in PEAK_BF16_DENSE if re.search(pattern, device_name)), None)


def synchronize(device: "torch.device") -> None:
    """Wait for the GPU's queued work when `device` is a CUDA device (a timing boundary); no-op on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def gpu_info() -> dict | None:
    """The CUDA GPUs torch sees: name of each, memory (GiB), compute capability, torch's CUDA version and
    the driver's (from nvidia-smi when it answers). None when torch is not imported yet or sees no GPU
    (it is never imported here: a CPU benchmark stays free of torch's start-up)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    devices = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        devices.append({"name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                        "capability": f"{prop.major}.{prop.minor}", "multiprocessors": prop.multi_processor_count})
    return {"count": len(devices), "devices": devices, "torch": torch.__version__, "cuda": torch.version.cuda,
            "driver": _nvidia_driver()}


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def machine_info() -> dict:
    """CPU model, usable cores, RAM (GiB), load average (1/5/15 min), library versions and, when torch is
    imported and sees CUDA GPUs, those GPUs (`gpu_info`: the device name every GPU result carries)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": cores,
        "ram_gib": _ram_gib(),
        "load_avg_1_5_15": load,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "faiss": _version("faiss"),
        "zarr": _version("zarr"),
        "dask": _version("dask"),
        "platform": platform.platform(),
        "executable": sys.executable,
        "gpu": gpu_info(),
    }


def check_gpu_device(parser: "argparse.ArgumentParser", device: str, dry_run: str) -> None:
    """Refuse (argparse error, exit 2) a `--device` that is not 'cuda', 'cuda:<i>' or 'cpu', or CUDA when torch
    sees no GPU; `dry_run` is the command line that runs the same code small on the CPU instead."""
    import torch

    if not re.fullmatch(r"cuda(:\d+)?|cpu", device):
        parser.error(f"--device: expected 'cuda', 'cuda:<index>' or 'cpu', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"a CUDA GPU is needed and torch sees none (torch.cuda.is_available() is False). To check the "
                     f"same code on the CPU: {dry_run}")


def report_gpu_result(name: str, result: dict, device: str) -> Path | None:
    """A GPU benchmark's result: written to `RESULTS_GPU/<name>.json` when it ran on a CUDA device; a CPU dry
    run's is printed with a note and never written (CPU numbers are not GPU results)."""
    if device.startswith("cuda"):
        return write_result(name, result, RESULTS_GPU)
    print(json.dumps({**result, "note": "CPU dry run of the GPU benchmark's code: not a GPU result, not written"}))
    return None


def write_result(name: str, result: dict, folder: Path = RESULTS) -> Path:
    """Write `<folder>/<name>.json` (pretty; default `benchmarks/results/`, GPU runs `RESULTS_GPU`) and print
    it as one JSON line."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(json.dumps(result))
    return path

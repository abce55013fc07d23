"""Machine description stored with every benchmark result (CPU, cores, RAM, load, versions)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def machine_info() -> dict:
    """CPU model, usable cores, RAM (GiB), load average (1/5/15 min) and library versions."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
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
    }


def write_result(name: str, result: dict) -> Path:
    """Write `benchmarks/results/<name>.json` (pretty) and print it as one JSON line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(json.dumps(result))
    return path

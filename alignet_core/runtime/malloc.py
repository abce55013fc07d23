"""glibc's malloc thresholds for the pipeline's processes: freed buffers reused, not unmapped.

glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB by default) with a fresh
mapping and unmaps it on free; the next buffer of that size faults its pages in one at a time, and the
kernel zeroes each. A forward pass of the demo's teacher (Lite2 at 260 px, 64 images) makes activations of
up to ~400 MB, freed and made again at every layer of every batch: on this 2-core machine 7.1 of the
forward's 16.6 CPU seconds were the kernel's. With the thresholds of `STAGE_PROCESS` the buffers stay in the
heap and are reused: the forward 1.87× faster, the demo 301 → 272 s (`python -m benchmarks.malloc`,
results/malloc.json).

The cost is resident memory: up to `trim_threshold` bytes of freed heap stay with the process instead of
going back to the OS (peak memory is what the work needs either way). These are process-wide settings, so
only the processes' entry points (the CLI, the service's engine, a distill rank, a Dask worker's setup)
apply them, and the CLI passes them on to the processes it starts (`child_environment`); library code never
does. `ALIGNET_MALLOC=default` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: glibc `mallopt` parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: the environment variable that turns the settings off (`default`)
ENV_VAR = "ALIGNET_MALLOC"


@dataclass(frozen=True)
class MallocThresholds:
    """Allocations up to `mmap_threshold` bytes come from the heap; up to `trim_threshold` bytes of free
    memory at its top are kept for reuse."""

    mmap_threshold: int
    trim_threshold: int


#: the pipeline's stage processes: a conv net's activations (hundreds of MB) are reused across batches;
#: 1 GiB of freed heap at most stays resident
STAGE_PROCESS = MallocThresholds(mmap_threshold=2**30, trim_threshold=2**30)
#: the sampling cluster's worker processes (many per machine): Zarr chunk buffers (~12 MB) reused, 32 MiB
#: of freed heap at most kept per worker
SAMPLING_WORKER = MallocThresholds(mmap_threshold=32 * 2**20, trim_threshold=32 * 2**20)
#: glibc's ceiling on its dynamic threshold (HEAP_MAX_SIZE / 2 on 64-bit), above which some releases refuse a
#: `mallopt` value (2.36, this machine's, takes 1 GiB)
GLIBC_DEFAULT_MAX = 32 * 2**20


def child_environment(thresholds: MallocThresholds) -> dict[str, str]:
    """glibc's environment variables for the same thresholds, for the processes a stage process starts (the
    Prefect server, DataLoader workers): glibc reads them as a process starts. Empty under
    `ALIGNET_MALLOC=default`."""
    if os.environ.get(ENV_VAR, "") == "default":
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(thresholds.mmap_threshold),
            "MALLOC_TRIM_THRESHOLD_": str(max(thresholds.trim_threshold, thresholds.mmap_threshold))}


def set_malloc_thresholds(thresholds: MallocThresholds) -> bool:
    """Set this process's glibc mmap and trim thresholds; True when glibc took them.

    A glibc that refuses the mmap threshold gets `GLIBC_DEFAULT_MAX` instead. Returns False and changes
    nothing where the C library is not glibc or `ALIGNET_MALLOC` is `default`.
    """
    if os.environ.get(ENV_VAR, "") == "default":
        log.debug("malloc thresholds left as they are (%s=default)", ENV_VAR)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("malloc thresholds not set: no glibc mallopt")
        return False
    mmap = thresholds.mmap_threshold
    if not mallopt(M_MMAP_THRESHOLD, mmap):
        mmap = min(mmap, GLIBC_DEFAULT_MAX)
        if not mallopt(M_MMAP_THRESHOLD, mmap):
            return False
    ok = bool(mallopt(M_TRIM_THRESHOLD, max(thresholds.trim_threshold, mmap)))
    log.debug("malloc thresholds: mmap %d, trim %d bytes (%s)", mmap, max(thresholds.trim_threshold, mmap), ok)
    return ok

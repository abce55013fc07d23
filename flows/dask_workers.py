"""The pipeline's own sampling cluster: reachable only by the pipeline, and the set-up of its worker
processes (malloc settings, the teacher's dot-product kernel loaded).

A `LocalCluster` of worker processes listens on loopback TCP ports, and any local user who finds them can
connect, submit a function and run it as the pipeline's user (issue 34: as uid 65534, a port scan and a
plain `Client` ran `os.system` inside a worker of the service's run). `quiet_local_cluster` starts it
with `distributed.security.Security.temporary()`: mutual TLS with a key and self-signed certificate made
for this cluster alone and held only in the memory of the process that starts it (and passed to its
workers); the scheduler, the workers and their nannies refuse a peer without that certificate, and the
client (Prefect's `DaskTaskRunner` connects with the cluster's own security) has it.

Distributed starts every worker with glibc's `MALLOC_TRIM_THRESHOLD_=65536` (so freed memory
goes back to the OS at once). That also pins glibc's mmap threshold at 128 KiB, so every buffer
above it (each Zarr chunk read, ~12 MB for 8192 × 768 float16 rows) is a fresh mapping whose
pages fault in one by one. Gathering a shard's rows from a 1M × 768 store took 3.0 s that way
and 1.3 s with the settings below (same process, same rows; this machine, November 2026).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from alignet_core.runtime.malloc import SAMPLING_WORKER, set_malloc_thresholds
from alignet_core.sample import native

log = logging.getLogger(__name__)

#: Dask config for the pipeline's own sampling workers: no statistical profiler (it samples the
#: task thread's stack every 10 ms, worker CPU that competes with the shards on small machines,
#: and the local cluster has no dashboard to show it)
WORKER_CONFIG = {"distributed.worker.profile.enabled": False, "distributed.worker.http.routes": []}

#: Dask config for the local cluster: its scheduler and workers serve nothing over HTTP (no
#: dashboard, no /metrics, no /info); a user who wants a dashboard points `sample.dask_address`
#: at a cluster of their own
NO_HTTP = {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}


def reuse_freed_buffers() -> bool:
    """Let glibc reuse freed buffers of up to 32 MiB instead of unmapping them (`malloc.SAMPLING_WORKER`: at most
    32 MiB of freed heap kept per worker). Returns False (and changes nothing) where the C library is not glibc."""
    return set_malloc_thresholds(SAMPLING_WORKER)


class SamplingWorkerSetup(WorkerPlugin):
    """Worker plugin run in each worker process as it starts: `reuse_freed_buffers`, then load the teacher's
    dot-product kernel (`sample.native`, built on this machine's first use), or, without it, import torch for
    numpy's path (the import takes ~2 s here, paid once per worker at start-up instead of inside its first
    shard)."""

    name = "alignet-sampling-worker-setup"

    def setup(self, worker: object) -> None:
        reuse_freed_buffers()
        if native.library() is None:
            importlib.import_module("torch")


def quiet_local_cluster(**kwargs: object) -> LocalCluster:
    """`distributed.LocalCluster(**kwargs)` that only the pipeline can reach, on loopback: its scheduler,
    workers and nannies speak mutual TLS with credentials made for it alone (`Security.temporary()`, unless
    `security` is given), so a client without them is refused; and they have no HTTP routes (`NO_HTTP`):
    the HTTP servers distributed always starts answer 404 to everything."""
    scheduler = {"dashboard": False, **dict(kwargs.pop("scheduler_kwargs", None) or {})}  # type: ignore[call-overload]
    security = kwargs.pop("security", None) or Security.temporary()
    with dask.config.set(NO_HTTP), _parent_environ_kept():
        return LocalCluster(**{"dashboard_address": "127.0.0.1:0", "host": "127.0.0.1", **kwargs},
                            scheduler_kwargs=scheduler, security=security, protocol="tls://")


@contextlib.contextmanager
def _parent_environ_kept() -> Iterator[None]:
    """Each nanny writes `distributed.nanny.pre-spawn-environ` (OMP_NUM_THREADS=1, MKL_…, MALLOC_TRIM_…) into
    this process's `os.environ` before it spawns its worker, and leaves it there: every process the pipeline
    starts later (the distill ranks) would then run single-threaded. The workers have what they need once
    spawned; the parent's variables are put back as they were."""
    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}) | {"PYTHONHASHSEED"}
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

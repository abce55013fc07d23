"""Embedding extraction on several devices: one Dask worker process per device, disjoint chunks each.

The rows of the source still to do are cut into as many contiguous runs of whole chunks as there
are devices (`shard_chunks`). Every chunk is written by exactly one worker, so no two processes
ever touch the same Zarr chunk, marker or skipped-list file, and each worker runs the very code a
single process runs (`extractor.embed_chunks`, which builds the model from the config, seeded for a
random init). Batches never cross a chunk boundary, so the store is byte for byte the one a single
process writes on the same kind of device, and a killed run resumes like a single-process one
(by either kind of run).

The cluster is local: distributed's `SpecCluster` (the class `LocalCluster` is built on) with one
single-threaded `Nanny` per device, because `LocalCluster` gives every worker the same options while
each worker here needs its own environment, and `CUDA_VISIBLE_DEVICES` is only honoured when set
before the worker process starts (CUDA reads it once, at initialisation). Worker k sees only its
GPU, as `cuda:0`, so nothing in it (pinned memory, cuDNN, a stray default-device call) can create a
context on another GPU; CPU workers see none. A `device` resource of 1 per worker and per task
keeps one shard per worker at a time; a worker that dies is restarted by its nanny and its shard
runs again, resuming from its finished chunks. Workers are non-daemonic processes so that they can
start DataLoader workers of their own, and Dask's default `OMP_NUM_THREADS=1` per worker applies
(one CPU thread each; on GPUs the loader workers do the CPU work).

The parent builds the store first (model on the CPU, for the shapes and the provenance; the
BatchNorm-folding check behind the provenance's `inference` line then runs on the CPU too), then only
waits, reporting progress from the finished-chunk markers.

`embed.devices` changes no output, so `embed.stage.plan_embed` leaves it out of the stage's content key
(as the sample stage leaves out `n_workers`): a store begun on two devices is reused, or resumed,
by a run on one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from alignet_core.config.embed import EmbedConfig
from alignet_core.embed.extractor import embed_chunks
from alignet_core.embed.reuse import RowReuse
from alignet_core.io import embedding_store
from alignet_core.io.sources import ImageSource

log = logging.getLogger(__name__)

RESOURCE = "device"
POLL_SECONDS = 1.0


def shard_chunks(chunks: list[int], n_shards: int) -> list[list[int]]:
    """Cut the sorted chunk numbers `chunks` into at most `n_shards` contiguous, non-empty runs of near-equal length."""
    n = len(chunks)
    bounds = [round(k * n / n_shards) for k in range(n_shards + 1)]
    return [chunks[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _worker_env(device: torch.device) -> tuple[dict[str, str], str]:
    """(environment set before the worker starts, the device name inside it) for one device."""
    if device.type == "cuda":
        return {"CUDA_VISIBLE_DEVICES": str(device.index or 0)}, "cuda:0"
    return {"CUDA_VISIBLE_DEVICES": ""}, "cpu"


def _embed_shard(source: ImageSource, cfg: EmbedConfig, store_url: str, device: str, chunks: list[int]) -> int:
    """Runs on a worker: the chunks `chunks` of an existing store, on this worker's device."""
    return embed_chunks(source, cfg, store_url, torch.device(device), chunks=chunks)


def embed_on_devices(
    source: ImageSource,
    cfg: EmbedConfig,
    store_url: str,
    devices: list[torch.device],
    progress: Callable[[int, int], None] | None = None,
    fingerprints: tuple[np.ndarray, np.ndarray] | None = None,
    reuse: RowReuse | None = None,
) -> None:
    """Embed every chunk of the store not yet done, one worker process per device in `devices`.

    `devices` come from `hardware.resolve_devices` (checked, one kind). `progress(done_rows, total_rows)`
    is called about every second from the finished-chunk markers. A worker's error is raised here.
    """
    import dask  # here, not with the module: one-device extraction runs where Dask is not installed
    from distributed import Client, Nanny, Scheduler, SpecCluster

    # create the store (and copy the rows reused from a previous store: the workers compute the others)
    embed_chunks(source, cfg, store_url, torch.device("cpu"), chunks=[], rows_device=devices[0],
                 fingerprints=fingerprints, reuse=reuse)
    n = len(source)
    every = list(embedding_store.iter_chunks(n, cfg.chunk_rows))
    tracker = embedding_store.ChunkProgress(store_url)

    def report() -> None:
        if progress is not None:
            done = tracker.done()
            progress(sum(stop - start for i, start, stop in every if i in done), n)

    todo = [i for i, _, _ in every if i not in tracker.done()]
    shards = shard_chunks(todo, len(devices))
    if not shards:
        report()
        return
    workers, local = {}, ""
    for k, device in enumerate(devices[: len(shards)]):
        env, local = _worker_env(device)
        workers[f"embed-{k}-{device}"] = {
            "cls": Nanny,
            "options": {"nthreads": 1, "env": env, "resources": {RESOURCE: 1}, "host": "127.0.0.1"},
        }
    log.info("embed: %d chunks left on %s, shards of %s chunks", len(todo), [str(d) for d in devices[: len(shards)]],
             [len(s) for s in shards])
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False}}
    with dask.config.set({"distributed.worker.daemon": False}), \
            SpecCluster(scheduler=scheduler, workers=workers, name="alignet-embed") as cluster, Client(cluster) as client:
        client.wait_for_workers(len(workers))
        futures = [
            client.submit(_embed_shard, source, cfg, store_url, local, shard, resources={RESOURCE: 1}, pure=False)
            for shard in shards
        ]
        while not all(f.done() for f in futures):
            for f in futures:
                if f.status == "error":
                    f.result()  # the first worker error, raised here; leaving the block stops the others
            time.sleep(POLL_SECONDS)
            report()
        for f in futures:
            f.result()
    report()

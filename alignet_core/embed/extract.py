"""Stage 0's entry point: embed every image of a source into a resumable embedding store, in this
process (`extractor.embed_chunks`) or in one worker process per device (`devices.embed_on_devices`),
and summarize what the store holds (rows, valid rows, skipped images).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from alignet_core.config.embed import EmbedConfig
from alignet_core.embed.devices import embed_on_devices
from alignet_core.embed.extractor import SKIPPED_DIR, embed_chunks
from alignet_core.embed.reuse import RowReuse, read_skipped
from alignet_core.errors import ConfigError
from alignet_core.hardware import resolve_devices
from alignet_core.io import embedding_store
from alignet_core.io.sources import ImageSource

log = logging.getLogger(__name__)


def extract_embeddings(
    source: ImageSource,
    cfg: EmbedConfig,
    store_url: str,
    device: torch.device,
    model: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    fingerprints: tuple[np.ndarray, np.ndarray] | None = None,
    reuse: RowReuse | None = None,
) -> dict:
    """Embed every image of `source` into the store at `store_url`, resuming where a previous run stopped.

    embeddings: (n, p) `cfg.store_dtype`, p = the model's pooled pre-logits width, computed in float32
    (bf16 autocast on GPUs that support it), channels_last, with every BatchNorm that directly follows a
    conv folded into it (`models.fold_batchnorm`, on a copy, checked against the unfolded model). `model` defaults to
    `create_model(cfg.model, cfg.weights)`; a model passed in must be that one (the store's provenance
    is taken from `cfg`) and is moved to `device`. `progress(done_rows, total_rows)` is called after
    every chunk written.

    `cfg.devices` replaces `device`: one device runs here; several run one Dask worker process each
    (`devices.embed_on_devices`) and give the same store. Devices are checked (`ConfigError`)
    before anything is written.

    `fingerprints` (the listing's sizes and mtimes, kept per row) and `reuse` (rows copied from a previous
    store, only the others embedded): `extractor.embed_chunks`.

    Returns {"n", "dim", "n_valid", "skipped": [{"id", "path", "reason"}], "seconds"}.
    """
    t0 = time.perf_counter()
    if cfg.devices is not None:
        devices = resolve_devices(cfg.devices)
        if len(devices) > 1:
            if model is not None:
                raise ConfigError("embed.devices: a model object cannot be handed to several worker processes; "
                                  "pass model=None (each worker builds cfg.model) or use one device")
            embed_on_devices(source, cfg, store_url, devices, progress=progress, fingerprints=fingerprints, reuse=reuse)
            return _summary(store_url, t0)
        device = devices[0]
    embed_chunks(source, cfg, store_url, device, model=model, progress=progress, fingerprints=fingerprints, reuse=reuse)
    return _summary(store_url, t0)


def _summary(store_url: str, t0: float) -> dict:
    g = embedding_store.open_embeddings(store_url)
    n, dim = g["embeddings"].shape
    n_valid = int(np.count_nonzero(g["valid"][:]))
    skipped_all = read_skipped(store_url, SKIPPED_DIR)
    seconds = time.perf_counter() - t0
    log.info("embed: %d/%d images embedded (dim %d), %d skipped, %.1f s", n_valid, n, dim, len(skipped_all), seconds)
    return {"n": int(n), "dim": int(dim), "n_valid": n_valid, "skipped": skipped_all, "seconds": seconds}

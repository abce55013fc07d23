"""Embedding extraction in one process (`embed_chunks`): teacher embeddings of a source's images,
written chunk by chunk into a resumable Zarr store.

The store (see `alignet_core.io.embedding_store.create_embedding_store`) holds `embeddings` (n, p) in the configured
dtype, `ids` (n,) str and `valid` (n,) bool. Rows are grouped in chunks of `cfg.chunk_rows`; a chunk is
decoded, embedded and written whole, then marked done under `_progress/`. A killed run resumes at the
first chunk without a marker, and because batches never cross a chunk boundary the bytes written are the
same whether or not the run was interrupted.

An image that cannot be decoded keeps its zero row with `valid = False`; its id, path and reason are
kept under `_skipped/<chunk>.json` and returned, so no other row shifts and nothing is lost silently.

Extra layers (`cfg.layers`, timm module names such as 'blocks.3') are captured in the same forward
pass (`layers`). The store's provenance names the model, weights, preprocessing, library versions and
the compute identity (device kind and dtype: GPU rows are bf16-autocast, CPU rows float32).

Speed. CPU (measured, `python -m benchmarks.embed --quick`): decode + transform in DataLoader workers,
channels_last, `torch.inference_mode`, conv+BatchNorm folding, float32; fp16/bf16 autocast is slower
on CPU and stays off (`hardware.autocast_dtype`). GPU path (same code, not measured on this CPU-only
machine): pinned host memory in the DataLoader, `.to(device, non_blocking=True)` so the copy of batch
k+1 overlaps the forward of batch k, bf16 autocast where supported, channels_last for conv nets.
Set `OMP_WAIT_POLICY=PASSIVE` before torch loads on shared CPUs (spinning OpenMP threads starve the
decode workers).

Options for scale (all off by default; see `EmbedConfig`):
- `compile`: `torch.compile` of the forward pass with one static batch shape (a chunk's short last
  batch is zero-padded to `batch_size` and the padding rows dropped), so a run compiles once. It is
  part of the stage's content key (it is a field of `EmbedConfig`) and recorded in the provenance:
  compiled kernels fuse and reorder float operations, so rows differ from eager ones in the last
  bits, and a store must hold rows of one computation only (a resumed or cached store is then
  bit-identical to an uninterrupted one).
- `devices`: several devices, one Dask worker process each over disjoint chunk-aligned rows
  (`alignet_core.embed.devices`), calling `embed_chunks` below; the store is the one a single
  process writes.
- `decode: torchvision`: loader workers only read bytes; whole JPEGs (`images.is_plain_jpeg`) are
  decoded a batch at a time by `torchvision.io.decode_jpeg` on the extraction device (nvjpeg on a
  GPU, libjpeg on the CPU) and resized there (`models.build_tensor_transform`); every other file,
  and any JPEG the device decoder refuses, takes the PIL path image by image, so undecodable files
  are skipped and reported exactly as with `pil`. On a CPU it rarely pays (decoding moves from the
  parallel loader workers into the main process); it exists for GPUs, where decoding in the loader
  workers is what limits images/s. Part of the key: resampling rounds differently from PIL's
  (pixels differ by at most one 8-bit level).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import timm
import torch

import alignet_core
from alignet_core.config.embed import EmbedConfig
from alignet_core.embed.layers import LayerCapture, layer_arrays, layer_dims
from alignet_core.embed.loader import image_loader
from alignet_core.embed.reuse import RowReuse, prefill, reused_mask
from alignet_core.errors import InputError
from alignet_core.hardware import ComputeIdentity, autocast_dtype, compute_identity
from alignet_core.io import embedding_store, store
from alignet_core.io.images import decode_image_bytes
from alignet_core.io.listing import DIGEST_ARRAY, MTIME_ARRAY, SIZE_ARRAY
from alignet_core.io.sources import ImageSource
from alignet_core.models.factory import (
    build_tensor_transform,
    build_transform,
    create_model,
    data_config,
    feature_dim,
    fold_batchnorm,
    pooled_features,
    resolve_weights,
)

log = logging.getLogger(__name__)

SKIPPED_DIR = "_skipped"


def _provenance(
    cfg: EmbedConfig, model: torch.nn.Module, source: ImageSource, n_folded: int, compute: ComputeIdentity
) -> dict[str, Any]:
    path = resolve_weights(cfg.model, cfg.weights)
    return {
        "stage": "embed",
        "model": cfg.model,
        "weights": cfg.weights,
        "weights_path": path,
        "weights_sha256": store.file_sha256(path) if path else None,
        "data_config": json.loads(json.dumps(data_config(model, cfg.image_size))),
        "feature": "pooled pre-logits (forward_head(pre_logits=True))",
        "feature_dim": feature_dim(model),
        "layers": list(cfg.layers),
        "layer_feature": "forward-hook output, global average over spatial positions / tokens",
        "inference": f"eval, inference_mode, channels_last, {n_folded} conv+BatchNorm pairs folded",
        "compile": cfg.compile,
        "decode": cfg.decode,
        "store_dtype": cfg.store_dtype,
        "chunk_rows": cfg.chunk_rows,
        "batch_size": cfg.batch_size,
        "source": source.description,
        "n": len(source),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "alignet_core_version": alignet_core.__version__,
        "compute": dataclasses.asdict(compute),
    }


def _inference_model(cfg: EmbedConfig, device: torch.device, model: torch.nn.Module | None) -> tuple[torch.nn.Module, int]:
    """The model on `device` in eval mode, channels_last, BatchNorms folded: (model, number of folded pairs)."""
    if model is None:
        # a random init (weights null) is seeded, so a resumed run (or another worker) has the very same model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(cfg.model, cfg.weights)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    _, h, w = data_config(model, cfg.image_size)["input_size"]
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    return fold_batchnorm(model, example.contiguous(memory_format=torch.channels_last), keep=set(cfg.layers))


def embed_chunks(
    source: ImageSource,
    cfg: EmbedConfig,
    store_url: str,
    device: torch.device,
    chunks: Sequence[int] | None = None,
    model: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    rows_device: torch.device | None = None,
    fingerprints: tuple[np.ndarray, np.ndarray] | None = None,
    reuse: RowReuse | None = None,
) -> int:
    """Embed the chunks numbered `chunks` (None: all) that the store has not marked done; returns how many ran.

    The store is created when missing (provenance from `cfg` and the model) and checked when it exists.
    Chunk i holds rows [i * cfg.chunk_rows, (i + 1) * cfg.chunk_rows); each is written whole, then marked
    done, so several processes may each run disjoint `chunks` of one existing store at the same time.
    `chunks=[]` only creates the store. `progress(done_rows, total_rows)` counts every marked chunk.
    `rows_device` is the device kind the rows are computed on, for the provenance (default `device`;
    the parent of several device workers creates the store on the CPU for them).

    `fingerprints`: the listing's (sizes, mtimes_ns), (n,) int64 each, kept in the store beside the ids
    (`io.listing`: what a later run compares against), with each row's content sha256 (`DIGEST_ARRAY`,
    of the bytes the loader read; a reused row keeps its previous one). `reuse`: rows of a previous store to
    copy instead of computing (`reuse.prefill`, once, when the store is created); only the other rows are
    embedded.
    """
    model, n_folded = _inference_model(cfg, device, model)
    tensor_transform = build_tensor_transform(model, cfg.image_size) if cfg.decode == "torchvision" else None  # checked first
    n, dim = len(source), feature_dim(model)
    g = embedding_store.create_embedding_store(
        store_url, n, dim, source.ids(), cfg.store_dtype, cfg.chunk_rows,
        _provenance(cfg, model, source, n_folded, compute_identity(rows_device or device)),
        rows={SIZE_ARRAY: fingerprints[0], MTIME_ARRAY: fingerprints[1]} if fingerprints is not None else None,
        digests=DIGEST_ARRAY if fingerprints is not None else None,
    )
    if not chunks:  # the whole store (or, with chunks=[], the parent before its workers start): no other writer
        embedding_store.remove_partial_writes(store_url)
    emb, valid = g["embeddings"], g["valid"]
    layers = layer_arrays(g, store_url, cfg, layer_dims(model, list(cfg.layers), device), n)
    digests = g[DIGEST_ARRAY] if DIGEST_ARRAY in g else None
    reused = reused_mask(g)
    if reused is None and reuse is not None:
        reused = prefill(g, store_url, reuse, SKIPPED_DIR)
    tracker = embedding_store.ChunkProgress(store_url)
    done = tracker.done()
    every = list(embedding_store.iter_chunks(n, cfg.chunk_rows))
    wanted = every if chunks is None else [every[i] for i in chunks]
    todo = [c for c in wanted if c[0] not in done]
    rows_done = sum(stop - start for i, start, stop in every if i in done)
    if chunks is None or todo:
        log.info("embed %s on %s: %d images, %d/%d chunks to do, store %s", cfg.model, device, n, len(todo),
                 len(wanted), store_url)
    if not todo:
        if progress is not None and chunks is None:
            progress(rows_done, n)
        return 0

    pil_transform = build_transform(model, cfg.image_size)
    run = _Extractor(model, cfg, device, source, pil_transform, tensor_transform, {k: a.shape[1] for k, a in layers.items()})
    loader = image_loader(source, pil_transform, tensor_transform is not None, todo, cfg.batch_size, cfg.num_workers,
                          device, reused)
    bar = _progress_bar(n, rows_done)
    batches = iter(loader)
    with run.capture:
        for i, start, stop in todo:
            keep = None if reused is None else reused[start:stop]
            feats, extra, ok, skipped, sha = run.chunk(batches, start, stop, 0 if keep is None else int(keep.sum()))
            if keep is not None and keep.any():  # the rows prefilled from the previous store stay as they are
                feats[keep] = np.asarray(emb[start:stop], dtype=np.float32)[keep]
                ok[keep] = np.asarray(valid[start:stop])[keep]
                for name, arr in layers.items():
                    extra[name][keep] = np.asarray(arr[start:stop], dtype=np.float32)[keep]
                if digests is not None:
                    sha[keep] = np.asarray(digests[start:stop])[keep]
            if digests is not None:
                digests[start:stop] = sha
            for name, arr in layers.items():
                arr[start:stop] = extra[name].astype(cfg.store_dtype)
            emb[start:stop] = feats.astype(cfg.store_dtype)
            valid[start:stop] = ok
            store.write_json_atomic(store.join(store_url, SKIPPED_DIR, f"{i:08d}.json"), skipped)
            tracker.mark(i)
            rows_done += stop - start
            for s in skipped:
                log.warning("embed: skipped %s (%s): %s", s["id"], s["path"], s["reason"])
            if bar is not None:
                bar.update(stop - start)
            if progress is not None:
                progress(rows_done, n)
    if bar is not None:
        bar.close()
    return len(todo)


class _Extractor:
    """The forward pass of one run: device, autocast, optional compile, hooks, and the on-device JPEG decode."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: EmbedConfig,
        device: torch.device,
        source: ImageSource,
        pil_transform: Callable[[Any], torch.Tensor],
        tensor_transform: Callable[[list[torch.Tensor]], torch.Tensor] | None,
        layer_dims: dict[str, int],
    ) -> None:
        self.model, self.device, self.source = model, device, source
        self.dim = feature_dim(model)
        self.amp = autocast_dtype(device)
        self.capture = LayerCapture(model, list(cfg.layers))  # hooks stay for the whole run: no recompiles
        self.layer_dims = layer_dims
        self.tensor_transform = tensor_transform
        self.pil_transform = pil_transform  # for JPEGs the device decoder refuses

        def forward(x: torch.Tensor) -> torch.Tensor:
            return pooled_features(model, x)

        # one static shape (dynamic=False, short batches padded): a run compiles once and every batch
        # runs the same kernels, so rows do not depend on where a chunk's batches end
        self.forward = torch.compile(forward, dynamic=False) if cfg.compile else forward
        self.pad_to = cfg.batch_size if cfg.compile else 0

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (b, 3, h, w) float on the device → pooled features (b, p) and hooked layers {name: (b, c)}."""
        b = x.shape[0]
        if b < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - b, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            f = self.forward(x)
        return f[:b], {name: self.capture.outputs[name][:b] for name in self.layer_dims}

    def decode_jpegs(self, index: list[int], data: list[torch.Tensor]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """JPEG bytes → (rows, (m, 3, h, w) float on the device, failures [(row, reason)]).

        One batched `decode_jpeg` on the device; when it raises, image by image, and an image the
        device decoder refuses goes through the PIL path (decoded or failing exactly as there)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(items: list[torch.Tensor]) -> list[torch.Tensor]:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities.*")
                return decode_jpeg(items, mode=ImageReadMode.RGB, device=self.device)

        images: list[torch.Tensor | None]
        try:
            images = list(decode(data))
        except RuntimeError:
            images = []
            for t in data:
                try:
                    images.append(decode([t])[0])
                except RuntimeError:
                    images.append(None)
        rows, xs, failed = [], [], []
        decoded = [(i, img) for i, img in zip(index, images) if img is not None]
        if decoded:
            rows.extend(i for i, _ in decoded)
            xs.append(self.tensor_transform([img for _, img in decoded]))
        for i, img, raw in zip(index, images, data):
            if img is not None:
                continue
            path = self.source.records[i].path
            log.info("embed: %s: the device JPEG decoder refused it; decoding with PIL", path)
            try:
                x = self.pil_transform(decode_image_bytes(bytes(raw.numpy()), path))
            except (InputError, OSError, ValueError) as err:
                failed.append((i, str(err)))
                continue
            rows.append(i)
            xs.append(x.unsqueeze(0).to(self.device))
        return rows, (torch.cat(xs) if xs else None), failed

    def chunk(
        self, batches: Iterator[dict[str, Any]], start: int, stop: int, n_reused: int = 0
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list[dict[str, str]], np.ndarray]:
        """Consume the batches of rows [start, stop) (all but the `n_reused` rows the loader leaves out).

        Returns features (rows, dim) float32, extra layers {name: (rows, c) float32}, valid (rows,) bool,
        skipped (in row order), and the sha256 of each row's bytes as read (rows, 32) uint8 (zero: unread).
        """
        rows = stop - start
        sha = np.zeros((rows, 32), dtype=np.uint8)
        feats = np.zeros((rows, self.dim), dtype=np.float32)
        extra = {name: np.zeros((rows, c), dtype=np.float32) for name, c in self.layer_dims.items()}
        ok = np.zeros(rows, dtype=bool)
        failed: list[tuple[int, str]] = []
        seen = 0
        while seen < rows - n_reused:
            batch = next(batches)
            failed.extend(batch["failed"])
            for i, d in batch["digest"]:
                sha[i - start] = np.frombuffer(d, dtype=np.uint8)
            seen += len(batch["index"]) + len(batch["jpeg"]) + len(batch["failed"])
            parts = []
            if batch["x"] is not None:
                parts.append((batch["index"].tolist(), batch["x"].to(self.device, non_blocking=True)))
            if batch["jpeg"]:
                jrows, jx, jfailed = self.decode_jpegs(batch["jpeg_index"], batch["jpeg"])
                failed.extend(jfailed)
                if jx is not None:
                    parts.append((jrows, jx))
            if not parts:
                continue
            idx = np.asarray([i for r, _ in parts for i in r], dtype=np.int64)
            f, hooked = self.features(torch.cat([x for _, x in parts]) if len(parts) > 1 else parts[0][1])
            feats[idx - start] = f.float().cpu().numpy()
            for name in extra:
                extra[name][idx - start] = hooked[name].float().cpu().numpy()
            ok[idx - start] = True
        skipped = []
        for j, reason in sorted(failed):
            rec = self.source.records[j]
            skipped.append({"id": rec.id, "path": rec.path, "reason": reason})
        return feats, extra, ok, skipped, sha


def _progress_bar(total: int, initial: int) -> Any:
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return None
    from tqdm.auto import tqdm

    # tqdm reads TQDM_* once, at import; the environment is checked above at call time instead
    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=False)

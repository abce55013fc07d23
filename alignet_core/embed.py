"""Stage 0: teacher embeddings of every image, written chunk by chunk into a resumable Zarr store.

The store (see `alignet_core.store.create_embedding_store`) holds `embeddings` (n, p) in the configured
dtype, `ids` (n,) str and `valid` (n,) bool. Rows are grouped in chunks of `cfg.chunk_rows`; a chunk is
decoded, embedded and written whole, then marked done under `_progress/`. A killed run resumes at the
first chunk without a marker, and because batches never cross a chunk boundary the bytes written are the
same whether or not the run was interrupted.

An image that cannot be decoded keeps its zero row with `valid = False`; its id, path and reason are
kept under `_skipped/<chunk>.json` and returned, so no other row shifts and nothing is lost silently.

Extra layers (`cfg.layers`, timm module names such as 'blocks.3') are captured by forward hooks in the
same forward pass, globally average-pooled ((b, c, h, w) → (b, c); token outputs (b, t, d) → (b, d)),
and written as `layers/<name>` (n, c) arrays chunk by chunk with the embeddings, so they resume alike.

Speed. CPU (measured, `python -m benchmarks.embed --quick`): decode + transform in DataLoader workers,
channels_last, `torch.inference_mode`, conv+BatchNorm folding, float32; fp16/bf16 autocast is slower
on CPU and stays off (`hardware.autocast_dtype`). GPU path (same code, not measured on this CPU-only
machine): pinned host memory in the DataLoader, `.to(device, non_blocking=True)` so the copy of batch
k+1 overlaps the forward of batch k, bf16 autocast where supported, channels_last for conv nets.
Set `OMP_WAIT_POLICY=PASSIVE` before torch loads on shared CPUs (spinning OpenMP threads starve the
decode workers).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, Dataset

import alignet_core
from alignet_core import store
from alignet_core.config import EmbedConfig
from alignet_core.errors import InputError, StoreError
from alignet_core.hardware import autocast_dtype
from alignet_core.models import (
    build_transform,
    create_model,
    data_config,
    feature_dim,
    fold_batchnorm,
    pooled_features,
    resolve_weights,
)
from alignet_core.sources import ImageSource, load_image

log = logging.getLogger(__name__)

SKIPPED_DIR = "_skipped"
LAYERS_GROUP = "layers"


class _ImageDataset(Dataset):
    """Item i → (i, (3, h, w) float32 tensor or None, reason or None) for record i of a source."""

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor]) -> None:
        self.records = source.records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_image(self.records[i].path)), None
        except (InputError, OSError, ValueError) as err:
            return i, None, str(err)


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Stack the decodable images of a batch; keep the others aside with their reasons."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    return {
        "index": torch.tensor([i for i, _ in ok], dtype=torch.long),
        "x": torch.stack([x for _, x in ok]) if ok else None,
        "failed": [(i, reason) for i, x, reason in items if x is None],
    }


def _batches(chunks: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Row indices per batch; batches stay inside their chunk so the result never depends on resume."""
    return [list(range(b, min(b + batch_size, stop))) for _, start, stop in chunks for b in range(start, stop, batch_size)]


def _provenance(cfg: EmbedConfig, model: torch.nn.Module, source: ImageSource, n_folded: int) -> dict[str, Any]:
    path = resolve_weights(cfg.model, cfg.weights)
    return {
        "stage": "embed",
        "model": cfg.model,
        "weights": cfg.weights,
        "weights_path": path,
        "weights_sha256": store.file_sha256(path) if path else None,
        "data_config": json.loads(json.dumps(data_config(model))),
        "feature": "pooled pre-logits (forward_head(pre_logits=True))",
        "feature_dim": feature_dim(model),
        "layers": list(cfg.layers),
        "layer_feature": "forward-hook output, global average over spatial positions / tokens",
        "inference": f"eval, inference_mode, channels_last, {n_folded} conv+BatchNorm pairs folded",
        "store_dtype": cfg.store_dtype,
        "chunk_rows": cfg.chunk_rows,
        "batch_size": cfg.batch_size,
        "source": source.description,
        "n": len(source),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "alignet_core_version": alignet_core.__version__,
    }


def _global_pool(out: Any, name: str) -> torch.Tensor:
    """A hooked module's output → (b, c): mean over (h, w) of (b, c, h, w), over tokens of (b, t, d)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"embed.layers: module {name!r} returns {type(out).__name__}, not a tensor")
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out.mean(dim=1)
    if out.ndim == 2:
        return out
    raise InputError(f"embed.layers: module {name!r} returns a tensor of shape {tuple(out.shape)}; expected 2-4 dims")


class LayerCapture:
    """Forward hooks that keep the pooled output (b, c) of named modules from the latest forward pass.

    Use as a context manager; the hooks are removed on exit. `outputs[name]` is (b, c) in the forward's dtype.
    """

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(n, list(modules), n=3, cutoff=0.5) for n in unknown}
            raise InputError(
                f"embed.layers: {unknown} are not modules of {type(model).__name__}; close matches: {hints} "
                "(names as in model.named_modules())"
            )
        self.names = list(names)
        self.modules = [modules[n] for n in names]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: Any, out: Any) -> None:
            self.outputs[name] = _global_pool(out, name)

        return hook


def layer_dims(model: torch.nn.Module, names: list[str], device: torch.device) -> dict[str, int]:
    """Width c of each named layer's pooled output, from one forward pass of a zero image at the model's input size."""
    if not names:
        return {}
    _, h, w = data_config(model)["input_size"]
    x = torch.zeros(1, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    with LayerCapture(model, names) as cap, torch.inference_mode():
        pooled_features(model, x)
    return {n: int(cap.outputs[n].shape[1]) for n in names}


def _layer_arrays(g: Any, url: str, cfg: EmbedConfig, dims: dict[str, int], n: int) -> dict[str, Any]:
    """The `layers/<name>` (n, c) arrays of the store, created on first use; checked on resume."""
    if list(g.attrs.get("layers", [])) != list(cfg.layers):
        raise StoreError(
            f"{url!r} was written with embed.layers={list(g.attrs.get('layers', []))}, not {list(cfg.layers)}; "
            "remove it or use a new key"
        )
    if not dims:
        return {}
    grp = g.require_group(LAYERS_GROUP)
    out = {}
    for name, c in dims.items():
        if name in grp:
            arr = grp[name]
            if arr.shape != (n, c) or str(arr.dtype) != cfg.store_dtype:
                raise StoreError(f"{url!r}: {LAYERS_GROUP}/{name} exists with another shape/dtype; remove it")
        else:
            arr = grp.create_array(name, shape=(n, c), dtype=cfg.store_dtype, chunks=(cfg.chunk_rows, c), fill_value=0)
        out[name] = arr
    return out


def _read_skipped(store_url: str) -> list[dict[str, str]]:
    """The skipped images of every finished chunk, in row order."""
    fs, path = fsspec.core.url_to_fs(store.join(store_url, SKIPPED_DIR))
    if not fs.exists(path):
        return []
    out: list[dict[str, str]] = []
    for p in sorted(fs.ls(path, detail=False)):
        if p.endswith(".json"):
            with fs.open(p, "rb") as f:
                out.extend(json.loads(f.read()))
    return out


def extract_embeddings(
    source: ImageSource,
    cfg: EmbedConfig,
    store_url: str,
    device: torch.device,
    model: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Embed every image of `source` into the store at `store_url`, resuming where a previous run stopped.

    embeddings: (n, p) `cfg.store_dtype`, p = the model's pooled pre-logits width, computed in float32
    (bf16 autocast on GPUs that support it), channels_last, with every BatchNorm that directly follows a
    conv folded into it (`models.fold_batchnorm`, on a copy, checked against the unfolded model). `model` defaults to
    `create_model(cfg.model, cfg.weights)`; a model passed in must be that one (the store's provenance
    is taken from `cfg`) and is moved to `device`. `progress(done_rows, total_rows)` is called after
    every chunk written.

    Returns {"n", "dim", "n_valid", "skipped": [{"id", "path", "reason"}], "seconds"}.
    """
    t0 = time.perf_counter()
    if model is None:
        # a random init (weights null) is seeded, so a resumed run continues with the very same model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(cfg.model, cfg.weights)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    _, h, w = data_config(model)["input_size"]
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    model, n_folded = fold_batchnorm(model, example.contiguous(memory_format=torch.channels_last), keep=set(cfg.layers))
    n, dim = len(source), feature_dim(model)
    g = store.create_embedding_store(
        store_url, n, dim, source.ids(), cfg.store_dtype, cfg.chunk_rows, _provenance(cfg, model, source, n_folded)
    )
    emb, valid = g["embeddings"], g["valid"]
    layers = _layer_arrays(g, store_url, cfg, layer_dims(model, list(cfg.layers), device), n)
    tracker = store.ChunkProgress(store_url)
    done = tracker.done()
    chunks = list(store.iter_chunks(n, cfg.chunk_rows))
    todo = [c for c in chunks if c[0] not in done]
    rows_done = sum(stop - start for i, start, stop in chunks if i in done)
    log.info("embed %s: %d images, %d/%d chunks left, store %s", cfg.model, n, len(todo), len(chunks), store_url)

    if todo:
        loader = DataLoader(
            _ImageDataset(source, build_transform(model)),
            batch_sampler=_batches(todo, cfg.batch_size),
            num_workers=cfg.num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        amp = autocast_dtype(device)
        bar = _progress_bar(n, rows_done)
        batches = iter(loader)
        capture = LayerCapture(model, list(cfg.layers))
        for i, start, stop in todo:
            with capture:
                feats, extra, ok, skipped = _embed_chunk(
                    model, batches, start, stop, dim, device, amp, source, capture, {k: a.shape[1] for k, a in layers.items()}
                )
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
    elif progress is not None:
        progress(n, n)

    n_valid = int(np.count_nonzero(valid[:]))
    skipped_all = _read_skipped(store_url)
    seconds = time.perf_counter() - t0
    log.info("embed: %d/%d images embedded (dim %d), %d skipped, %.1f s", n_valid, n, dim, len(skipped_all), seconds)
    return {"n": n, "dim": dim, "n_valid": n_valid, "skipped": skipped_all, "seconds": seconds}


def _embed_chunk(
    model: torch.nn.Module,
    batches: Iterator[dict[str, Any]],
    start: int,
    stop: int,
    dim: int,
    device: torch.device,
    amp: torch.dtype | None,
    source: ImageSource,
    capture: LayerCapture,
    layer_dims: dict[str, int],
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list[dict[str, str]]]:
    """Consume the batches of rows [start, stop).

    Returns features (rows, dim) float32, extra layers {name: (rows, c) float32}, valid (rows,) bool, skipped.
    """
    rows = stop - start
    feats = np.zeros((rows, dim), dtype=np.float32)
    extra = {name: np.zeros((rows, c), dtype=np.float32) for name, c in layer_dims.items()}
    ok = np.zeros(rows, dtype=bool)
    skipped: list[dict[str, str]] = []
    seen = 0
    while seen < rows:
        batch = next(batches)
        idx = batch["index"].numpy()
        for j, reason in batch["failed"]:
            rec = source.records[j]
            skipped.append({"id": rec.id, "path": rec.path, "reason": reason})
        seen += len(idx) + len(batch["failed"])
        if batch["x"] is None:
            continue
        x = batch["x"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = pooled_features(model, x)
        feats[idx - start] = f.float().cpu().numpy()
        for name in extra:
            extra[name][idx - start] = capture.outputs[name].float().cpu().numpy()
        ok[idx - start] = True
    return feats, extra, ok, skipped


def _progress_bar(total: int, initial: int) -> Any:
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return None
    from tqdm.auto import tqdm

    # tqdm reads TQDM_* once, at import; the environment is checked above at call time instead
    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=False)

"""Stage 0: teacher embeddings of every image, written chunk by chunk into a resumable Zarr store.

The store (see `alignet_core.io.embedding_store.create_embedding_store`) holds `embeddings` (n, p) in the configured
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

import functools
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, Dataset

import alignet_core
from alignet_core.io import embedding_store, store
from alignet_core.config import EmbedConfig
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.hardware import autocast_dtype, resolve_devices
from alignet_core.models import (
    build_tensor_transform,
    build_transform,
    create_model,
    data_config,
    feature_dim,
    fold_batchnorm,
    pooled_features,
    resolve_weights,
)
from alignet_core.io.images import decode_image_bytes, is_plain_jpeg, read_image_bytes
from alignet_core.io.sources import ImageSource

log = logging.getLogger(__name__)

SKIPPED_DIR = "_skipped"
LAYERS_GROUP = "layers"


class _ImageDataset(Dataset):
    """Item i → (i, (3, h, w) float32 tensor or None, JPEG bytes (m,) uint8 or None, reason or None).

    With `jpeg_bytes`, a whole plain JPEG comes back undecoded (for a batched decode on the extraction
    device); everything else is decoded and transformed here by PIL, or fails with its reason.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor], jpeg_bytes: bool = False) -> None:
        self.records = source.records
        self.transform = transform
        self.jpeg_bytes = jpeg_bytes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        path = self.records[i].path
        try:
            data = read_image_bytes(path)
            if self.jpeg_bytes and is_plain_jpeg(data):
                return i, None, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
            return i, self.transform(decode_image_bytes(data, path)), None, None
        except (InputError, OSError, ValueError) as err:
            return i, None, None, str(err)


def _collate(items: list[tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Stack the decoded images of a batch; keep JPEG bytes and failures (with their reasons) aside."""
    ok = [(i, x) for i, x, _, _ in items if x is not None]
    return {
        "index": torch.tensor([i for i, _ in ok], dtype=torch.long),
        "x": torch.stack([x for _, x in ok]) if ok else None,
        "jpeg_index": [i for i, _, b, _ in items if b is not None],
        "jpeg": [b for _, _, b, _ in items if b is not None],
        "failed": [(i, reason) for i, x, b, reason in items if x is None and b is None],
    }


def _end_with_parent(parent_pid: int, _worker_id: int) -> None:
    """DataLoader worker init: on Linux, have the kernel SIGKILL this loader worker when its parent dies.

    torch's own watchdog looks only every 5 s, and a worker whose output pipe is full when its parent
    is killed (SIGKILL, OOM killer) never gets there: it would linger forever, holding memory.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


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
        # keys fixed up front: torch.compile guards on this dict, so filling it later would recompile once
        self.outputs: dict[str, torch.Tensor] = {n: torch.empty(0) for n in self.names}
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

    `cfg.devices` replaces `device`: one device runs here; several run one Dask worker process each
    (`embed_parallel.embed_on_devices`) and give the same store. Devices are checked (`ConfigError`)
    before anything is written.

    Returns {"n", "dim", "n_valid", "skipped": [{"id", "path", "reason"}], "seconds"}.
    """
    t0 = time.perf_counter()
    if cfg.devices is not None:
        devices = resolve_devices(cfg.devices)
        if len(devices) > 1:
            if model is not None:
                raise ConfigError("embed.devices: a model object cannot be handed to several worker processes; "
                                  "pass model=None (each worker builds cfg.model) or use one device")
            from alignet_core.embed.devices import embed_on_devices

            embed_on_devices(source, cfg, store_url, devices, progress=progress)
            return _summary(store_url, t0)
        device = devices[0]
    embed_chunks(source, cfg, store_url, device, model=model, progress=progress)
    return _summary(store_url, t0)


def _summary(store_url: str, t0: float) -> dict:
    g = embedding_store.open_embeddings(store_url)
    n, dim = g["embeddings"].shape
    n_valid = int(np.count_nonzero(g["valid"][:]))
    skipped_all = _read_skipped(store_url)
    seconds = time.perf_counter() - t0
    log.info("embed: %d/%d images embedded (dim %d), %d skipped, %.1f s", n_valid, n, dim, len(skipped_all), seconds)
    return {"n": int(n), "dim": int(dim), "n_valid": n_valid, "skipped": skipped_all, "seconds": seconds}


def _inference_model(cfg: EmbedConfig, device: torch.device, model: torch.nn.Module | None) -> tuple[torch.nn.Module, int]:
    """The model on `device` in eval mode, channels_last, BatchNorms folded: (model, number of folded pairs)."""
    if model is None:
        # a random init (weights null) is seeded, so a resumed run (or another worker) has the very same model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(cfg.model, cfg.weights)
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    _, h, w = data_config(model)["input_size"]
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
) -> int:
    """Embed the chunks numbered `chunks` (None: all) that the store has not marked done; returns how many ran.

    The store is created when missing (provenance from `cfg` and the model) and checked when it exists.
    Chunk i holds rows [i * cfg.chunk_rows, (i + 1) * cfg.chunk_rows); each is written whole, then marked
    done, so several processes may each run disjoint `chunks` of one existing store at the same time.
    `chunks=[]` only creates the store. `progress(done_rows, total_rows)` counts every marked chunk.
    """
    model, n_folded = _inference_model(cfg, device, model)
    tensor_transform = build_tensor_transform(model) if cfg.decode == "torchvision" else None  # checked first
    n, dim = len(source), feature_dim(model)
    g = embedding_store.create_embedding_store(
        store_url, n, dim, source.ids(), cfg.store_dtype, cfg.chunk_rows, _provenance(cfg, model, source, n_folded)
    )
    emb, valid = g["embeddings"], g["valid"]
    layers = _layer_arrays(g, store_url, cfg, layer_dims(model, list(cfg.layers), device), n)
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

    pil_transform = build_transform(model)
    run = _Extractor(model, cfg, device, source, pil_transform, tensor_transform, {k: a.shape[1] for k, a in layers.items()})
    loader = DataLoader(
        _ImageDataset(source, pil_transform, jpeg_bytes=tensor_transform is not None),
        batch_sampler=_batches(todo, cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(_end_with_parent, os.getpid()),
    )
    bar = _progress_bar(n, rows_done)
    batches = iter(loader)
    with run.capture:
        for i, start, stop in todo:
            feats, extra, ok, skipped = run.chunk(batches, start, stop)
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
        self, batches: Iterator[dict[str, Any]], start: int, stop: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list[dict[str, str]]]:
        """Consume the batches of rows [start, stop).

        Returns features (rows, dim) float32, extra layers {name: (rows, c) float32}, valid (rows,) bool,
        skipped (in row order).
        """
        rows = stop - start
        feats = np.zeros((rows, self.dim), dtype=np.float32)
        extra = {name: np.zeros((rows, c), dtype=np.float32) for name, c in self.layer_dims.items()}
        ok = np.zeros(rows, dtype=bool)
        failed: list[tuple[int, str]] = []
        seen = 0
        while seen < rows:
            batch = next(batches)
            failed.extend(batch["failed"])
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
        return feats, extra, ok, skipped


def _progress_bar(total: int, initial: int) -> Any:
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return None
    from tqdm.auto import tqdm

    # tqdm reads TQDM_* once, at import; the environment is checked above at call time instead
    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=False)

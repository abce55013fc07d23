"""The human-aligned affine teacher transform: f(x) = ((x − μ) / σ) W + b (docs/method.md, stage 1).

μ, σ are one global scalar mean and std of the object embeddings; W (p × p) and b are fitted by
`alignet_core.transform.fit.fit_transform`. This module holds the transform itself: applying it
(numpy, torch), saving and loading it (safetensors + JSON), and writing the transformed copy of an
embedding store chunk by chunk, resumably.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save

from alignet_core.errors import InputError, StoreError
from alignet_core.io import embedding_store, store
from alignet_core.runtime.progress import ProgressLog

log = logging.getLogger(__name__)


@dataclass
class AffineTransform:
    """f(x) = ((x − mean) / std) @ weight + bias.

    mean, std: the global scalars of standardization; weight: (p, p) float32; bias: (p,) float32;
    info: free metadata (config, history) kept in the JSON beside a saved transform.
    """

    mean: float
    std: float
    weight: np.ndarray
    bias: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x: (n, p) any float dtype → (n, p') float32, computed in float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise InputError(f"embeddings: expected shape (n, {self.weight.shape[0]}), got {x.shape}")
        z = (x - np.float32(self.mean)) / np.float32(self.std)
        return (z @ self.weight.astype(np.float32) + self.bias.astype(np.float32)).astype(np.float32)

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, p) tensor on any device → (n, p') float32 on the same device."""
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise InputError(f"embeddings: expected shape (n, {self.weight.shape[0]}), got {tuple(x.shape)}")
        w = torch.as_tensor(self.weight, dtype=torch.float32, device=x.device)
        b = torch.as_tensor(self.bias, dtype=torch.float32, device=x.device)
        z = (x.to(torch.float32) - float(self.mean)) / float(self.std)
        return z @ w + b

    def digest(self) -> str:
        """A short hash of mean, std, weight and bias (identifies the transform in store attributes)."""
        h = hashlib.sha256()
        h.update(np.asarray([self.mean, self.std], dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.weight, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.bias, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def save(self, url: str, info: dict[str, Any]) -> None:
        """Write weight and bias as a safetensors file at `url` (mean and std also in its metadata,
        as one JSON string under 'standardization': safetensors writes several metadata keys in a
        random order, one key keeps the file byte-identical run after run) and `<url>.json` with mean,
        std, digest and `info` (config, history). Each file is written whole or not at all on a local
        filesystem."""
        payload = st_save(
            {
                "weight": np.ascontiguousarray(self.weight, dtype=np.float32),
                "bias": np.ascontiguousarray(self.bias, dtype=np.float32),
            },
            metadata={"standardization": json.dumps({"mean": float(self.mean), "std": float(self.std)})},
        )
        store.write_bytes_atomic(url, payload)
        meta = {"mean": float(self.mean), "std": float(self.std), "dim": self.dim, "digest": self.digest(), "info": info}
        store.write_json_atomic(f"{url}.json", meta)
        self.info = info

    @classmethod
    def load(cls, url: str) -> "AffineTransform":
        """Read a transform written by `save`; `InputError` naming the file when it is missing or malformed."""
        tensors = store.read_safetensors(url, "transform")
        if "weight" not in tensors or "bias" not in tensors:
            raise InputError(f"{url}: expected tensors 'weight' and 'bias', got {sorted(tensors)}")
        weight, bias = tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise InputError(f"{url}: weight {weight.shape} and bias {bias.shape} do not form an affine map")
        try:
            meta = store.read_json(f"{url}.json")
        except StoreError as err:
            raise InputError(f"{url}: its metadata file is missing or unreadable ({err})") from None
        try:
            mean, std = float(meta["mean"]), float(meta["std"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{url}.json: expected numeric 'mean' and 'std'") from None
        return cls(mean=mean, std=std, weight=weight, bias=bias, info=meta.get("info", {}))


def load_saved_fit(url: str) -> AffineTransform | None:
    """The transform a stage saved at `url` with its fit metrics (`info["metrics"]`), or None when there
    is none or it is incomplete (a run killed between the weights and their metadata): refit then."""
    if not store.exists(url):
        return None
    try:
        saved = AffineTransform.load(url)
    except InputError as err:
        log.warning("ignoring an incomplete saved transform, refitting: %s", err)
        return None
    return saved if isinstance(saved.info.get("metrics"), dict) else None


# ----------------------------------------------------------------------------- applying to a store
def _jsonable(obj: Any) -> Any:
    """Plain JSON types for store attributes: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def apply_transform_to_store(
    in_url: str, out_url: str, transform: AffineTransform, chunk_rows: int, device: torch.device
) -> dict[str, int]:
    """Write the transformed copy of an embedding store, chunk by chunk and resumable.

    Reads `embeddings` (n, p), `ids`, `valid` at in_url; writes a float32 store (n, p') at out_url
    with the input's attributes plus `transform` (mean, std, digest, info); among them the embed store's
    `listing`, so the check before k-means and sampling (`sources.check_same_images`) reads no ids. Rows whose `valid` is
    False stay zero and invalid. Finished chunks are recorded with `embedding_store.ChunkProgress` and
    skipped on a rerun, which must use the same chunk_rows and transform (else `StoreError`).
    Math in float32 on `device`. Returns {"n": rows, "dim": p', "chunks_written": this call's}.
    """
    if chunk_rows <= 0:
        raise InputError(f"chunk_rows: expected a positive count, got {chunk_rows}")
    src = embedding_store.open_embeddings(in_url)
    emb, valid_arr = src["embeddings"], src["valid"]
    n, p = emb.shape
    if p != transform.weight.shape[0]:
        raise InputError(f"{in_url}: embeddings have dim {p}, the transform expects {transform.weight.shape[0]}")
    ids = np.array(np.asarray(src["ids"][:]).tolist(), dtype=str)  # zarr returns numpy StringDType
    info = {"mean": transform.mean, "std": transform.std, "digest": transform.digest(), "info": transform.info}
    # keys sorted: a fit loaded back from its JSON and the same fit in memory give identical store bytes
    attrs = {**dict(src.attrs), "transform": json.loads(json.dumps(_jsonable(info), sort_keys=True))}
    # raw, not zstd: clustering and every sampling shard read this store whole
    out = embedding_store.create_embedding_store(out_url, n, transform.dim, ids, "float32", chunk_rows, attrs, compressed=False)
    prev = dict(out.attrs).get("transform", {})
    if prev.get("digest") != transform.digest() or out["embeddings"].chunks[0] != chunk_rows:
        raise StoreError(
            f"{out_url!r} holds a partial output of another transform or chunk size; remove it or use a new key"
        )
    progress = embedding_store.ChunkProgress(out_url)
    done = progress.done()
    written = 0
    rows = ProgressLog("transform apply", "rows", n)
    rows_done = sum(stop - start for i, start, stop in embedding_store.iter_chunks(n, chunk_rows) if i in done)
    rows.update(rows_done)
    with torch.no_grad():
        for i, start, stop in embedding_store.iter_chunks(n, chunk_rows):
            if i in done:
                continue
            v = np.asarray(valid_arr[start:stop], dtype=bool)
            x = torch.as_tensor(np.asarray(emb[start:stop]), device=device)
            y = transform.apply_torch(x)
            y[torch.as_tensor(~v, device=device)] = 0.0
            out["embeddings"][start:stop] = y.cpu().numpy()
            out["valid"][start:stop] = v
            progress.mark(i)
            written += 1
            rows_done += stop - start
            rows.update(rows_done)
    log.info("transformed store %s: %d rows, %d chunks written, %d resumed", out_url, n, written, len(done))
    return {"n": int(n), "dim": transform.dim, "chunks_written": written}

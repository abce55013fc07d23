"""Stage 1: the human-aligned affine teacher transform (gLocal / uncertainty distillation).

f(x) = ((x − μ) / σ) W + b, with one global scalar mean μ and std σ of the object embeddings,
W ∈ R^{p×p} initialised at 1e-3·I and b at 0 (METHOD.md, stage 1). It is fitted on human
odd-one-out triplets (i, j, k), k the odd one, with

    loss = (1 − α) · global + α · local + λ · ‖W − mean(diag W) · I‖²_F

- global: dot-product similarities s = [s_ij, s_ik, s_jk] of the transformed embeddings;
  hard targets: cross-entropy that (i, j) is the most similar pair under softmax(s / T);
  soft targets (uncertainty distillation): KL(p ‖ softmax(s / T)), p the response probabilities.
- local (LukasMut/gLocal's contrastive term): for a batch of pool embeddings, row-wise softmax
  over cosine similarities with the diagonal removed, temperature τ; the untransformed
  (standardized) rows give the targets, the transformed rows the predictions; cross-entropy.
  It keeps the teacher's own neighbourhoods while the global term reshapes the coarse geometry.

Why the tiny init: standardized embeddings of width p have dot products of order p, far too
large for softmax(s / T = 1) to express graded human choice probabilities. W = 1e-3·I starts at
near-uniform choices and the fit grows the scale (through mean(diag W), which the regularizer
leaves free) until softmax of the dot products is calibrated to the human probabilities. That is
what lets stage 3 store transformed dot products as calibrated similarities. The fit reports
whether it got there (`FitResult.calibration`) and warns when it stayed near uniform.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save as st_save

from alignet_core.io import embedding_store, store
from alignet_core.config import TransformConfig
from alignet_core.hardware import deterministic_torch
from alignet_core.errors import InputError, StoreError
from alignet_core.evaluate.metrics import odd_one_out_accuracy
from alignet_core.io.formats import validate_triplets

log = logging.getLogger(__name__)

W_INIT = 1e-3
SGD_MOMENTUM = 0.9
# Precompute the teacher's full cosine matrix of the local-term pool when it has at most this many rows.
_TEACHER_CACHE_ROWS = 4096
# A fitted transform whose mean held-out probability of the chosen pair stays below this is
# still close to uniform choices (1/3): it did not reach the calibrated regime.
_NEAR_UNIFORM = 0.4


# ----------------------------------------------------------------------------- the transform
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


@dataclass
class FitResult:
    """Outcome of `fit_transform`.

    history: one dict per epoch (train_loss, train_global, val_loss, val_acc, scale); best_epoch:
    0-based epoch whose weights were kept; accuracies are odd-one-out accuracies (chance 1/3);
    val_loss_*: the held-out global term (KL to the held-out probabilities for soft targets with
    val_probs, else cross-entropy of the observed choice); calibration: mean held-out probability
    the fitted softmax(s / T) gives the (i, j) pair (`p_pred`), the same mean of the human
    probabilities where known (`p_target`), and the mean spread max(s) − min(s) of the held-out
    similarities (`spread`).
    """

    transform: AffineTransform
    history: list[dict[str, float]]
    best_epoch: int
    val_acc_before: float
    val_acc_after: float
    train_acc_after: float
    val_loss_before: float = float("nan")
    val_loss_after: float = float("nan")
    calibration: dict[str, float] = field(default_factory=dict)
    seconds: float = float("nan")


# ----------------------------------------------------------------------------- loss terms
def scaled_identity_penalty(weight: torch.Tensor) -> torch.Tensor:
    """‖W − mean(diag W) · I‖²_F: pulls W toward a scaled identity, leaving its scale free.

    weight: (p, p) tensor → scalar tensor.
    """
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return ((weight - torch.diagonal(weight).mean() * eye) ** 2).sum()


def triplet_similarities(z: torch.Tensor) -> torch.Tensor:
    """z: (B, 3, p) transformed embeddings of (i, j, k) → (B, 3) dot products [s_ij, s_ik, s_jk]."""
    a, b, c = z[:, 0], z[:, 1], z[:, 2]
    return torch.stack([(a * b).sum(-1), (a * c).sum(-1), (b * c).sum(-1)], dim=1)


def global_loss(sims: torch.Tensor, probs: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Odd-one-out loss of similarities (B, 3) [s_ij, s_ik, s_jk], k the odd one.

    probs None: cross-entropy that (i, j) is the most similar pair under softmax(s / T) (gLocal);
    probs (B, 3): KL(probs ‖ softmax(s / T)) (uncertainty distillation). Mean over the batch.
    """
    logits = sims / temperature
    if probs is None:
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    return F.kl_div(F.log_softmax(logits, dim=1), probs, reduction="batchmean")


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """(N, N) → (N, N − 1): each row without its diagonal entry."""
    n = m.shape[0]
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def local_loss(teacher_cos: torch.Tensor, transformed: torch.Tensor, tau: float) -> torch.Tensor:
    """gLocal's local contrastive term.

    teacher_cos: (N, N) cosine similarities of the untransformed rows; transformed: (N, p) the
    same rows after the transform. Cross-entropy between the row-wise softmax(teacher / τ) and
    softmax(cos(transformed) / τ), diagonal removed, mean over rows.
    """
    zn = F.normalize(transformed, dim=1)
    target = F.softmax(_off_diagonal(teacher_cos) / tau, dim=1)
    log_q = F.log_softmax(_off_diagonal(zn @ zn.T) / tau, dim=1)
    return -(target * log_q).sum(1).mean()


# ----------------------------------------------------------------------------- the fit
def _check_probs(probs: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if probs is None:
        return None
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n, 3):
        raise InputError(f"{what}: expected shape ({n}, 3) to match the triplets, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise InputError(f"{what}: probabilities must be finite, non-negative and sum to 1 per row")
    return p


@deterministic_torch()
def fit_transform(
    objects: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    cfg: TransformConfig,
    seed: int,
    device: torch.device,
    train_probs: np.ndarray | None = None,
    val_probs: np.ndarray | None = None,
    pool: np.ndarray | None = None,
) -> FitResult:
    """Fit the gLocal affine transform on human odd-one-out triplets.

    objects: (m, p) float object embeddings; train, val: (n, 3) int rows into objects, the odd one
    in column 2; train_probs, val_probs: optional (n, 3) probabilities of the pairs
    [(i, j), (i, k), (j, k)] (used when cfg.targets == 'soft'; without train_probs the fit falls
    back to hard targets); pool: (N, p) embeddings of the local term, default the objects.

    Minibatches of cfg.batch_size triplets, cfg.epochs at most, Adam or SGD (momentum 0.9) at
    cfg.lr; after each epoch the held-out global loss decides early stopping (cfg.patience) and
    the best epoch's weights are kept. Deterministic for a seed (a private torch.Generator).
    """
    t_start = time.perf_counter()
    obj = np.asarray(objects)
    if obj.ndim != 2 or obj.shape[0] < 3:
        raise InputError(f"objects: expected shape (m, p) with m >= 3, got {obj.shape}")
    if not np.isfinite(obj).all():
        raise InputError("objects: embeddings contain NaN or inf")
    m, p = obj.shape
    train = validate_triplets(train, m, "train triplets")
    val = validate_triplets(val, m, "val triplets")
    if len(train) == 0 or len(val) == 0:
        raise InputError(f"fit_transform: needs training and held-out triplets, got {len(train)} and {len(val)}")
    train_p = _check_probs(train_probs, len(train), "train_probs")
    val_p = _check_probs(val_probs, len(val), "val_probs")
    soft = cfg.targets == "soft" and train_p is not None
    if cfg.targets == "soft" and train_p is None:
        log.warning("transform.targets is 'soft' but no response probabilities were given; fitting hard targets")
    soft_val = soft and val_p is not None

    mean = float(obj.astype(np.float64).mean())
    std = float(obj.astype(np.float64).std())
    if not std > 0:
        raise InputError("objects: all embedding values are equal; cannot standardize")
    x = torch.as_tensor((obj.astype(np.float64) - mean) / std, dtype=torch.float32, device=device)
    if pool is None:
        xp = x
    else:
        pool_arr = np.asarray(pool)
        if pool_arr.ndim != 2 or pool_arr.shape[1] != p or len(pool_arr) < 2:
            raise InputError(f"pool: expected shape (N, {p}) with N >= 2, got {pool_arr.shape}")
        xp = torch.as_tensor((pool_arr.astype(np.float64) - mean) / std, dtype=torch.float32, device=device)
    use_local = cfg.alpha > 0
    n_pool = xp.shape[0]
    local_rows = min(cfg.local_batch, n_pool)
    pool_unit = F.normalize(xp, dim=1)
    teacher_full = pool_unit @ pool_unit.T if (use_local and n_pool <= _TEACHER_CACHE_ROWS) else None

    tr = torch.as_tensor(train, device=device)
    va = torch.as_tensor(val, device=device)
    tr_p = torch.as_tensor(train_p, dtype=torch.float32, device=device) if soft else None
    va_p = torch.as_tensor(val_p, dtype=torch.float32, device=device) if soft_val else None

    weight = torch.nn.Parameter(W_INIT * torch.eye(p, dtype=torch.float32, device=device))
    bias = torch.nn.Parameter(torch.zeros(p, dtype=torch.float32, device=device))
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([weight, bias], lr=cfg.lr)
    else:
        opt = torch.optim.SGD([weight, bias], lr=cfg.lr, momentum=SGD_MOMENTUM)
    gen = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def evaluate(w: torch.Tensor, b: torch.Tensor) -> tuple[float, float, dict[str, float]]:
        z = x @ w + b
        s = triplet_similarities(z[va])
        loss = float(global_loss(s, va_p, cfg.temperature))
        acc = float(((s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])).float().mean())
        q = F.softmax(s / cfg.temperature, dim=1)
        cal = {
            "p_pred": float(q[:, 0].mean()),
            "p_target": float(val_p[:, 0].mean()) if val_p is not None else float("nan"),
            "spread": float((s.max(1).values - s.min(1).values).mean()),
        }
        return loss, acc, cal

    val_loss_before, _, _ = evaluate(weight.detach(), bias.detach())
    history: list[dict[str, float]] = []
    best = (math.inf, -1, weight.detach().clone(), bias.detach().clone())
    n_train = len(train)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_train, generator=gen).to(device)
        tot, tot_global, steps = 0.0, 0.0, 0
        for start in range(0, n_train, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            batch = tr[idx]
            # transform each distinct object of the batch once
            uniq, inv = torch.unique(batch, return_inverse=True)
            z = (x[uniq] @ weight + bias)[inv]
            g = global_loss(triplet_similarities(z), tr_p[idx] if tr_p is not None else None, cfg.temperature)
            loss = (1.0 - cfg.alpha) * g
            if use_local:
                rows = torch.randperm(n_pool, generator=gen)[:local_rows].to(device)
                t_cos = teacher_full[rows][:, rows] if teacher_full is not None else pool_unit[rows] @ pool_unit[rows].T
                loss = loss + cfg.alpha * local_loss(t_cos, xp[rows] @ weight + bias, cfg.tau)
            if cfg.lam > 0:
                loss = loss + cfg.lam * scaled_identity_penalty(weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            tot_global += float(g.detach())
            steps += 1
        if not math.isfinite(tot):
            raise InputError(
                f"fit_transform: the loss became non-finite in epoch {epoch}; lower transform.lr (now {cfg.lr})"
            )
        val_loss, val_acc, cal = evaluate(weight.detach(), bias.detach())
        history.append(
            {
                "epoch": epoch,
                "train_loss": tot / steps,
                "train_global": tot_global / steps,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "scale": float(torch.diagonal(weight.detach()).mean()),
                "p_pred": cal["p_pred"],
            }
        )
        log.debug("transform epoch %d: %s", epoch, history[-1])
        if val_loss < best[0]:
            best = (val_loss, epoch, weight.detach().clone(), bias.detach().clone())
        elif epoch - best[1] >= cfg.patience:
            log.info("transform: early stop after epoch %d (best %d)", epoch, best[1])
            break

    _, best_epoch, w_best, b_best = best
    val_loss_after, _, calibration = evaluate(w_best, b_best)
    transform = AffineTransform(
        mean=mean, std=std, weight=w_best.cpu().numpy().astype(np.float32), bias=b_best.cpu().numpy().astype(np.float32)
    )
    z_std = ((obj.astype(np.float64) - mean) / std).astype(np.float32)
    z_after = transform.apply(obj)
    result = FitResult(
        transform=transform,
        history=history,
        best_epoch=best_epoch,
        val_acc_before=odd_one_out_accuracy(z_std, val),
        val_acc_after=odd_one_out_accuracy(z_after, val),
        train_acc_after=odd_one_out_accuracy(z_after, train),
        val_loss_before=val_loss_before,
        val_loss_after=val_loss_after,
        calibration=calibration,
        seconds=time.perf_counter() - t_start,
    )
    if calibration["p_pred"] < _NEAR_UNIFORM:
        log.warning(
            "transform: held-out choice probabilities stayed near uniform (mean p(i,j) = %.3f); the dot "
            "products did not reach a calibrated scale - raise transform.lr or transform.epochs",
            calibration["p_pred"],
        )
    log.info(
        "transform fitted in %.1fs: val acc %.3f -> %.3f, val loss %.3f -> %.3f, best epoch %d",
        result.seconds, result.val_acc_before, result.val_acc_after, val_loss_before, val_loss_after, best_epoch,
    )
    return result


def fit_info(result: FitResult, cfg: TransformConfig) -> dict[str, Any]:
    """The JSON-able record saved beside a fitted transform: config, history and summary."""
    return {
        "config": cfg.model_dump(),
        "history": copy.deepcopy(result.history),
        "best_epoch": result.best_epoch,
        "val_acc_before": result.val_acc_before,
        "val_acc_after": result.val_acc_after,
        "train_acc_after": result.train_acc_after,
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
        "calibration": dict(result.calibration),
    }


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
    with the input's attributes plus `transform` (mean, std, digest, info). Rows whose `valid` is
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
    log.info("transformed store %s: %d rows, %d chunks written, %d resumed", out_url, n, written, len(done))
    return {"n": int(n), "dim": transform.dim, "chunks_written": written}

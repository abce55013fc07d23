"""Fitting the human-aligned affine transform (gLocal / uncertainty distillation).

f(x) = ((x − μ) / σ) W + b, with one global scalar mean μ and std σ of the object embeddings,
W ∈ R^{p×p} initialised at 1e-3·I and b at 0 (docs/method.md, stage 1). It is fitted on human
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
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alignet_core.config.transform import TransformConfig
from alignet_core.errors import InputError
from alignet_core.hardware import deterministic_torch
from alignet_core.io.formats import validate_triplets
from alignet_core.runtime.progress import ProgressLog
from alignet_core.stats.metrics import odd_one_out_correct
from alignet_core.transform.affine import AffineTransform

log = logging.getLogger(__name__)

W_INIT = 1e-3


SGD_MOMENTUM = 0.9


# Precompute the teacher's full cosine matrix of the local-term pool when it has at most this many rows.
_TEACHER_CACHE_ROWS = 4096


# A fitted transform whose mean held-out probability of the chosen pair stays below this is
# still close to uniform choices (1/3): it did not reach the calibrated regime.
_NEAR_UNIFORM = 0.4


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
    early_stopping: bool = True,
) -> FitResult:
    """Fit the gLocal affine transform on human odd-one-out triplets.

    objects: (m, p) float object embeddings; train, val: (n, 3) int rows into objects, the odd one
    in column 2; train_probs, val_probs: optional (n, 3) probabilities of the pairs
    [(i, j), (i, k), (j, k)] (used when cfg.targets == 'soft'; without train_probs the fit falls
    back to hard targets); pool: (N, p) embeddings of the local term, default the objects.

    Minibatches of cfg.batch_size triplets, cfg.epochs at most, Adam or SGD (momentum 0.9) at
    cfg.lr; after each epoch the held-out global loss decides early stopping (cfg.patience) and
    the best epoch's weights are kept. With `early_stopping` False (the refit on every triplet, its
    epoch count chosen by cross-validation) all cfg.epochs run, `val` is only monitored and the last
    epoch's weights are kept. μ and σ are those of `objects`: pass only the objects a fit may see.
    Deterministic for a seed (a private torch.Generator).
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
    epochs = ProgressLog("transform fit", "epochs", cfg.epochs)
    epochs.update(0)
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
        epochs.update(epoch + 1, f", val loss {val_loss:.4f}, val acc {val_acc:.3f}")
        if val_loss < best[0] or not early_stopping:
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
        val_acc_before=chunked_accuracy(z_std, val),
        val_acc_after=chunked_accuracy(z_after, val),
        train_acc_after=chunked_accuracy(z_after, train),
        val_loss_before=val_loss_before,
        val_loss_after=val_loss_after,
        calibration=calibration,
        seconds=time.perf_counter() - t_start,
    )
    if calibration["p_pred"] < _NEAR_UNIFORM:
        log.warning("transform: %s", near_uniform_message(len(history), cfg.epochs, best_epoch, calibration["p_pred"]))
    log.info(
        "transform fitted in %.1fs: val acc %.3f -> %.3f, val loss %.3f -> %.3f, best epoch %d",
        result.seconds, result.val_acc_before, result.val_acc_after, val_loss_before, val_loss_after, best_epoch,
    )
    return result


def chunked_accuracy(embeddings: np.ndarray, triplets: np.ndarray) -> float:
    """`odd_one_out_accuracy` (dot products) over row chunks: gathering (t, p) rows three times at once
    needs 12·t·p bytes (a THINGS refit: 4.7M triplets at p = 1152 would be 65 GB)."""
    t = np.asarray(triplets)
    if len(t) == 0:
        return float("nan")
    step = max(1024, 2**24 // max(1, embeddings.shape[1]))
    hits = sum(int(odd_one_out_correct(embeddings, t[i:i + step]).sum()) for i in range(0, len(t), step))
    return hits / len(t)


def near_uniform_message(epochs_run: int, max_epochs: int, best_epoch: int, p_pred: float) -> str:
    """What happened when the kept weights leave the held-out choices near uniform (mean p(i,j) =
    `p_pred` < 0.4): early stopping chose an early epoch (more epochs would not help: the held-out
    loss rose after it), or the fit ran out of epochs while still improving (they would)."""
    if best_epoch == epochs_run - 1 and epochs_run == max_epochs:
        return (f"the held-out loss was still falling at the last epoch ({max_epochs}) and the held-out choice "
                f"probabilities are still near uniform (mean p(i,j) = {p_pred:.3f}): raise transform.epochs or "
                "transform.lr")
    return (f"early stopping kept epoch {best_epoch + 1} of the {epochs_run} run (the held-out loss was lowest there "
            f"and rose after it); at that epoch the held-out choice probabilities are near uniform (mean p(i,j) = "
            f"{p_pred:.3f}): the held-out triplets give the transform little to sharpen, and more epochs or a higher "
            "learning rate would not change that")


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

"""k-means in torch, for a CUDA GPU that FAISS cannot use.

FAISS's GPU build needs its own CUDA libraries, and the pip wheels of `faiss-cpu` see no GPU;
torch, which the pipeline already needs, usually does. `hardware.kmeans_backend` picks this path
when torch sees a GPU and FAISS does not. It does what the FAISS path does, in the same order:

- `greedy_kmeans_plusplus`: the init of `cluster.greedy_kmeans_plusplus` (same candidates per
  centre, same random draws for a seed), with the distances computed on the device.
- `lloyd`: FAISS's `Clustering::train` iterations: assign every row to its nearest centroid,
  record the objective (sum of squared L2 distances; of inner products when spherical), stop
  one iteration after an assignment repeats the previous one (the centroids stop moving and
  the objective repeats: FAISS, with its default `early_stop_threshold` of 0, stops there; it
  may stop a few iterations sooner, when its float32 sum of the objective repeats while a few
  rows still move), move
  each centroid to the mean of its rows, split a large cluster into any empty one as FAISS does
  (`split_clusters`: copy a centroid drawn ∝ its size − 1, then nudge the two apart by ±1/1024),
  renormalize when spherical.
- `nearest`: exact nearest centroid of each row, as FAISS's flat index gives it.

Distances are float32 with TF32 left as torch's default (off for matrix products), and
centroid sums float64, so results match FAISS's CPU ones up to summation order. On a GPU the
sums' order varies from run to run (`index_add_` adds atomically); in float64 that rarely moves
a float32 centroid, but the GPU path is not promised to be bit-for-bit repeatable. Rows are processed in blocks so that the (rows, k)
distance block stays near `BLOCK_BYTES`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from alignet_core.errors import ConfigError

log = logging.getLogger(__name__)

#: bytes of the (rows, k) float32 distance block computed at once
BLOCK_BYTES = 256 * 2**20
#: rows summed into the centroids at once (a float64 copy of them is made)
UPDATE_ROWS = 65536
#: relative nudge FAISS gives a split centroid and its source (faiss/Clustering.cpp, EPS)
SPLIT_EPS = 1 / 1024


def _block_rows(k: int) -> int:
    return max(1024, BLOCK_BYTES // (4 * k))


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """(n,) squared norms of the rows of x, a block at a time (no (n, p) temporary)."""
    return torch.cat([(b * b).sum(1) for b in x.split(UPDATE_ROWS)])


def nearest(x: torch.Tensor, centroids: torch.Tensor, spherical: bool,
            x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x (n, p): (scores (n,) float32, indices (n,) int64).

    Scores are squared L2 distances (clamped at 0), or inner products when spherical (the
    largest wins), as FAISS's IndexFlatL2 / IndexFlatIP return them. `x_sq`: the rows' squared
    norms when the caller has them (Lloyd iterations reuse one x), else computed here.
    """
    if not spherical and x_sq is None:
        x_sq = _squared_norms(x)
    scores = torch.empty(len(x), dtype=torch.float32, device=x.device)
    idx = torch.empty(len(x), dtype=torch.int64, device=x.device)
    c_sq = (centroids * centroids).sum(1)
    step = _block_rows(len(centroids))
    for lo in range(0, len(x), step):
        xb = x[lo : lo + step]
        ip = xb @ centroids.T
        if spherical:
            best, arg = ip.max(1)
        else:
            ip.mul_(-2).add_(c_sq)  # |c|² − 2x·c: the row's own |x|² does not change the argmin
            best, arg = ip.min(1)
            best = (best + x_sq[lo : lo + step]).clamp_(min=0)
        scores[lo : lo + step], idx[lo : lo + step] = best, arg
    return scores, idx


def greedy_kmeans_plusplus(x: torch.Tensor, k: int, seed: int, n_trials: int | None = None) -> torch.Tensor:
    """k initial centroids (k, p) from the rows of x by greedy k-means++, on x's device.

    The rule and the random draws of `cluster.greedy_kmeans_plusplus` (numpy's generator,
    seeded the same), so both pick the same rows unless two candidates' potentials differ by
    less than float32 rounding.
    """
    n = len(x)
    if not 0 < k <= n:
        raise ConfigError(f"cluster.k = {k}: k-means++ needs 1 ≤ k ≤ {n} rows")
    trials = n_trials or 2 + int(np.log(k))
    rng = np.random.default_rng(seed)
    sq = (x * x).sum(1)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    closest = (sq - 2 * (x @ x[int(chosen[0])]) + sq[int(chosen[0])]).clamp_(min=0)
    for c in range(1, k):
        cum = torch.cumsum(closest, 0, dtype=torch.float64)
        total = float(cum[-1])
        if total <= 0:  # every row sits on a centre already: take any row not chosen yet
            chosen[c] = np.setdiff1d(np.arange(n), chosen[:c])[0]
            continue
        draws = torch.as_tensor(rng.random(trials) * total, dtype=torch.float64, device=x.device)
        cand = torch.searchsorted(cum, draws, right=True).clamp_(max=n - 1)
        d = x[cand] @ x.T
        d.mul_(-2).add_(sq).add_(sq[cand, None]).clamp_(min=0)
        d = torch.minimum(d, closest)
        best = int(torch.argmin(d.sum(1, dtype=torch.float64)))
        chosen[c], closest = int(cand[best]), d[best].clone()
    return x[torch.as_tensor(chosen, device=x.device)].clone()


def _split_empty(centroids: torch.Tensor, counts: np.ndarray, rng: np.random.Generator) -> int:
    """FAISS's `split_clusters`: give each empty cluster half of a large one. Returns how many."""
    k, n = len(counts), int(counts.sum())
    empty = np.flatnonzero(counts == 0)
    sign = torch.where(torch.arange(centroids.shape[1], device=centroids.device) % 2 == 0, 1.0, -1.0)
    for ci in empty:
        cj = 0
        while True:  # a cluster drawn with probability ∝ its size − 1, as FAISS walks them
            if rng.random() < (counts[cj] - 1.0) / max(n - k, 1):
                break
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def lloyd(x: torch.Tensor, init: torch.Tensor, niter: int, spherical: bool, seed: int,
          stop_when_converged: bool = True) -> tuple[torch.Tensor, list[float]]:
    """`niter` Lloyd iterations from `init` (k, p) on the rows of x (n, p), both on one device.

    Returns (centroids (k, p) float32, the objective of each iteration's assignment; fewer than
    `niter` when the assignment converged, unless `stop_when_converged` is False).
    `seed` drives the draws that refill empty clusters.
    """
    k, p = init.shape
    n = len(x)
    if n < k:
        raise ConfigError(f"cluster.k = {k}: more centroids than the {n} training rows")
    rng = np.random.default_rng(seed)
    centroids = init.to(torch.float32).clone()
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    x_sq = None if spherical else _squared_norms(x)
    curve: list[float] = []
    previous, converged = None, False
    for _ in range(niter):
        scores, idx = nearest(x, centroids, spherical, x_sq)
        curve.append(float(scores.sum(dtype=torch.float64)))
        if converged and stop_when_converged:  # this objective repeats the last one; FAISS stops on that, so here too
            break
        converged = previous is not None and torch.equal(idx, previous)
        previous = idx
        sums = torch.zeros((k, p), dtype=torch.float64, device=x.device)
        for lo in range(0, n, UPDATE_ROWS):
            sums.index_add_(0, idx[lo : lo + UPDATE_ROWS], x[lo : lo + UPDATE_ROWS].to(torch.float64))
        counts_t = torch.bincount(idx, minlength=k)
        nonempty = counts_t > 0
        centroids = torch.where(nonempty[:, None], (sums / counts_t.clamp(min=1)[:, None]).to(torch.float32), centroids)
        counts = counts_t.cpu().numpy()
        if (counts == 0).any():
            split = _split_empty(centroids, counts, rng)
            log.debug("k-means: %d empty clusters refilled by splitting", split)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids, curve

"""Dense soft-labelled triplets over the objects that have images, from every human trial.

A lab's images usually cover a small part of a triplet file's objects (the demo's emoji: 225 of THINGS'
1,854 concepts; 238 of 115k trials name three of them). Every trial still constrains the similarity of
those objects through the others, so (the AligNet paper's uncertainty-distillation route): fit VICE on
all the trials over all declared objects, then draw triplets over the objects with images and label
each with VICE's posterior-predictive choice probabilities. The observed odd one of each drawn triplet
is sampled from those probabilities (a simulated participant), and its probability row goes with it as
the soft target; its provenance is "VICE posterior predictive", never "human".

Held-out honesty is the caller's: `exclude` names declared objects whose trials must not reach this
VICE fit (every trial naming one is dropped, counted in `DenseTriplets.n_trials_dropped`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from alignet_core.config.human import ViceConfig
from alignet_core.errors import InputError
from alignet_core.human.triplets import observe
from alignet_core.human.vice import ViceModel, fit_vice

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DenseTriplets:
    """triplets: (n, 3) int64 ids of `pool` objects, the sampled odd one in column 2; probs: (n, 3)
    float32 VICE choice probabilities of the pairs [(t0, t1), (t0, t2), (t1, t2)] of each row."""

    triplets: np.ndarray
    probs: np.ndarray
    model: ViceModel
    n_trials_fit: int
    n_trials_dropped: int  # trials naming an excluded object


def distinct_triples(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) int64 rows of three distinct objects of `pool`, uniform over ordered triples."""
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) < 3:
        raise InputError(f"densify: need at least 3 objects to draw triplets from, got {len(pool)}")
    idx = rng.integers(0, len(pool), size=(n, 3))
    while True:
        bad = (idx[:, 0] == idx[:, 1]) | (idx[:, 0] == idx[:, 2]) | (idx[:, 1] == idx[:, 2])
        if not bad.any():
            return pool[idx]
        idx[bad] = rng.integers(0, len(pool), size=(int(bad.sum()), 3))


def trials_without(trials: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """The rows of `trials` that name none of the `exclude` objects."""
    if exclude is None or len(exclude) == 0:
        return trials
    return trials[~np.isin(trials, np.asarray(exclude)).any(1)]


def labelled(model: ViceModel, drawn: np.ndarray, rng: np.random.Generator, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(triplets, probs) of `drawn` (n, 3) object ids of `model`: VICE's posterior-predictive choice
    probabilities, and the odd one of each row sampled from them (column 2; its probability row permuted to
    match)."""
    triplets, probs, _ = observe(drawn, model.predict_probabilities(drawn, seed=seed), rng)
    return triplets, probs


def densify(
    trials: np.ndarray,
    n_declared: int,
    pool: np.ndarray,
    n_triplets: int,
    vice_cfg: ViceConfig,
    seed: int,
    device: torch.device,
    exclude: np.ndarray | None = None,
) -> DenseTriplets:
    """VICE fitted on `trials` (int (t, 3) ids < n_declared, odd one in column 2) less those naming an
    `exclude` object, then `n_triplets` triplets over the declared ids in `pool` with its choice
    probabilities (see the module doc). Deterministic for a seed."""
    fit_on = trials_without(trials, exclude)
    if len(fit_on) == 0:
        raise InputError("densify: no trial is left to fit VICE on once the held-out objects' trials are removed")
    if exclude is not None and np.isin(pool, exclude).any():
        raise InputError("densify: the pool of objects to draw from contains an excluded object")
    model = fit_vice(fit_on, n_declared, vice_cfg, seed, device)
    rng = np.random.default_rng([seed, 31])
    triplets, probs = labelled(model, distinct_triples(pool, n_triplets, rng), rng, seed)
    log.info("densify: VICE (%d dims) on %d trials (%d dropped for held-out objects) → %d triplets over %d objects",
             model.dim, len(fit_on), len(trials) - len(fit_on), n_triplets, len(pool))
    return DenseTriplets(triplets=triplets, probs=probs, model=model, n_trials_fit=int(len(fit_on)),
                         n_trials_dropped=int(len(trials) - len(fit_on)))

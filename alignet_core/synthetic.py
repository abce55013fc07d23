"""Synthetic "human" odd-one-out data with a known answer (the stand-in for THINGS in tests and benchmarks).

The generating model is VICE's own: each object has a sparse non-negative embedding
y_o ∈ R^d_+ (m objects × d concepts; each concept present in an object with probability
`density`, its weight drawn from a half-normal), and a "human" shown (i, j, k) picks the most
similar pair with probability softmax([y_i·y_j, y_i·y_k, y_j·y_k]) (temperature 1). The
`scale` multiplies the embedding and sets how deterministic the choices are, hence the noise
ceiling (the accuracy of the generating model on its own sampled choices).

The teacher never sees y directly: its features mix y linearly (a random d → `signal_dims`
map) with clustered nuisance dimensions that carry most of the variance, apply a random
rotation of the whole space and add isotropic noise. A linear transform can therefore recover
the human space, but the untransformed teacher's zero-shot accuracy is near chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignet_core.errors import InputError

# For an observed choice c of the most similar pair among [(i,j), (i,k), (j,k)] of (i, j, k):
# the new object order (chosen pair first, odd one last) and the matching pair permutation
# (the same tables as `alignet_core.human.triplets` and `formats.order_by_similarity`).
_IMAGE_PERM = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])
_PAIR_PERM = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])


@dataclass
class SyntheticHuman:
    """A synthetic human data set.

    features: (m, p) float32 teacher features of the objects; triplets: (n, 3) int64, the
    *sampled* odd one out in column 2; probs: (n, 3) float32, the generating model's
    probabilities of the pairs [(t0, t1), (t0, t2), (t1, t2)] of each returned row;
    embedding: (m, d) float32 the generating sparse non-negative embedding (scale included).
    """

    features: np.ndarray
    triplets: np.ndarray
    probs: np.ndarray
    embedding: np.ndarray

    @property
    def n_objects(self) -> int:
        return int(self.features.shape[0])


def choice_probabilities(embedding: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """Softmax choice model: embedding (m, d), triplets (n, 3) → (n, 3) float64 probabilities of
    the pairs [(i, j), (i, k), (j, k)] under softmax of their dot products (T = 1)."""
    e = np.asarray(embedding, dtype=np.float64)
    a, b, c = e[triplets[:, 0]], e[triplets[:, 1]], e[triplets[:, 2]]
    s = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1)
    q = np.exp(s - s.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True)


def random_triplets(n_objects: int, n_triplets: int, rng: np.random.Generator) -> np.ndarray:
    """(n_triplets, 3) int64 triplets of three distinct objects drawn uniformly."""
    t = rng.integers(0, n_objects, size=(n_triplets, 3))
    # redraw the (rare) rows with a repeated object until all are distinct
    while True:
        bad = (t[:, 0] == t[:, 1]) | (t[:, 0] == t[:, 2]) | (t[:, 1] == t[:, 2])
        if not bad.any():
            return t.astype(np.int64)
        t[bad] = rng.integers(0, n_objects, size=(int(bad.sum()), 3))


def make_synthetic_human(
    n_objects: int = 150,
    n_concepts: int = 10,
    n_triplets: int = 20000,
    feature_dim: int = 48,
    signal_dims: int = 12,
    density: float = 0.35,
    scale: float = 0.9,
    nuisance_scale: float = 1.0,
    n_nuisance_clusters: int = 6,
    noise: float = 0.3,
    seed: int = 0,
) -> SyntheticHuman:
    """Generate objects, their teacher features and human-like triplet choices with a known model.

    n_objects m, n_concepts d (the true VICE dimensionality), feature_dim p ≥ signal_dims ≥ d;
    the signal part of the features is y @ A (A: (d, signal_dims) Gaussian), the other
    p − signal_dims dims are nuisance (cluster centres with spread `nuisance_scale` plus
    unit-scale within-cluster variation); a random rotation mixes all p dims and Gaussian noise of
    std `noise` · (signal std) is added. Deterministic for a seed.
    """
    if n_objects < 3:
        raise InputError(f"n_objects: expected at least 3, got {n_objects}")
    if not 0 < n_concepts <= signal_dims <= feature_dim:
        raise InputError(
            f"n_concepts, signal_dims, feature_dim: expected 0 < {n_concepts} <= {signal_dims} <= {feature_dim}"
        )
    if not 0.0 < density <= 1.0:
        raise InputError(f"density: expected a value in (0, 1], got {density}")
    if n_triplets < 0:
        raise InputError(f"n_triplets: expected a non-negative count, got {n_triplets}")
    rng = np.random.default_rng(seed)

    # sparse non-negative embedding; every object gets at least one concept
    present = rng.random((n_objects, n_concepts)) < density
    empty = ~present.any(1)
    present[np.flatnonzero(empty), rng.integers(0, n_concepts, int(empty.sum()))] = True
    weights = np.abs(rng.normal(size=(n_objects, n_concepts))) + 0.5
    embedding = scale * present * weights

    # teacher features: signal mixed with nuisance, rotated, noisy
    mix = rng.normal(size=(n_concepts, signal_dims)) / np.sqrt(n_concepts)
    signal = embedding @ mix
    signal = (signal - signal.mean(0)) / (signal.std() + 1e-12)
    n_nuis = feature_dim - signal_dims
    centres = rng.normal(size=(n_nuisance_clusters, n_nuis)) * nuisance_scale
    nuisance = centres[rng.integers(0, n_nuisance_clusters, n_objects)] + rng.normal(size=(n_objects, n_nuis))
    rot, _ = np.linalg.qr(rng.normal(size=(feature_dim, feature_dim)))
    features = np.concatenate([signal, nuisance], axis=1) @ rot
    features = features + noise * rng.normal(size=features.shape) + 0.5

    # triplets: uniform objects, choice sampled from the softmax model, chosen odd one last
    t = random_triplets(n_objects, n_triplets, rng)
    probs = choice_probabilities(embedding, t)
    choice = (rng.random(n_triplets)[:, None] > np.cumsum(probs, axis=1)).sum(1).clip(0, 2)
    t = np.take_along_axis(t, _IMAGE_PERM[choice], axis=1)
    probs = np.take_along_axis(probs, _PAIR_PERM[choice], axis=1)
    return SyntheticHuman(
        features=features.astype(np.float32),
        triplets=t.astype(np.int64),
        probs=probs.astype(np.float32),
        embedding=embedding.astype(np.float32),
    )


def ceiling_accuracy(probs: np.ndarray) -> float:
    """Accuracy of the generating model on its sampled choices (the noise ceiling).

    probs: (n, 3) as returned in `SyntheticHuman` (column 0 is the chosen pair). A row scores 1
    when the chosen pair is the model's most probable one, and 1/t when it ties with t − 1
    others (random tie breaking; sparse embeddings give exact ties such as all-zero similarities).
    """
    p = np.asarray(probs, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    top = np.isclose(p, p.max(1, keepdims=True), rtol=0.0, atol=1e-7)
    return float(np.mean(top[:, 0] / top.sum(1)))

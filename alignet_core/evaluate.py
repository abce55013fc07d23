"""Alignment metrics: odd-one-out accuracy, triplet accuracy against a teacher, cluster agreement."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def pair_similarities(embeddings: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """Dot-product similarities [s01, s02, s12] of each triplet.

    embeddings: (n, p) float; triplets: (m, 3) int rows into embeddings. Returns (m, 3) float32.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    a, b, c = e[triplets[:, 0]], e[triplets[:, 1]], e[triplets[:, 2]]
    return np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1)


def odd_one_out_accuracy(embeddings: np.ndarray, triplets: np.ndarray) -> float:
    """Fraction of human triplets (odd one in column 2) whose most similar pair is (0, 1).

    This is the zero-shot odd-one-out accuracy of the ICLR 2023 paper (chance 1/3). A tie for
    the largest similarity counts as wrong.
    """
    if len(triplets) == 0:
        return float("nan")
    s = pair_similarities(embeddings, triplets)
    return float(np.mean((s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])))


def triplet_accuracy(student_sims: np.ndarray) -> float:
    """AligNet triplet accuracy: fraction of rows (teacher's odd one last) where the student's
    s01 is strictly largest. student_sims: (m, 3) [s01, s02, s12] in the dataset's row order."""
    s = np.asarray(student_sims)
    if len(s) == 0:
        return float("nan")
    return float(np.mean((s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])))


def cluster_agreement(labels: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    """NMI and ARI between reference labels (n,) and cluster assignments (n,)."""
    return {
        "nmi": float(normalized_mutual_info_score(labels, assignments)),
        "ari": float(adjusted_rand_score(labels, assignments)),
    }

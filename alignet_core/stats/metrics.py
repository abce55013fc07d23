"""Alignment metrics: odd-one-out accuracy, triplet accuracy against a teacher, cluster agreement."""

from __future__ import annotations

import numpy as np


def pair_similarities(embeddings: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    """Dot-product similarities [s01, s02, s12] of each triplet.

    embeddings: (n, p) float; triplets: (m, 3) int rows into embeddings. Returns (m, 3) float32.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    a, b, c = e[triplets[:, 0]], e[triplets[:, 1]], e[triplets[:, 2]]
    return np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], axis=1)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(n, p) → (n, p) float32 rows scaled to unit length (zero rows stay zero): dot products of
    these are cosine similarities."""
    e = np.asarray(embeddings, dtype=np.float32)
    return e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)


def odd_one_out_correct(embeddings: np.ndarray, triplets: np.ndarray, similarity: str = "dot") -> np.ndarray:
    """(t,) bool: whether each triplet's most similar pair (strictly) is (0, 1), i.e. the model
    picks column 2 as the odd one out. similarity: 'dot' (dot products of the rows) or 'cosine'
    (gLocal's zero-shot protocol on raw features)."""
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity: expected 'dot' or 'cosine', got {similarity!r}")
    e = unit_rows(embeddings) if similarity == "cosine" else embeddings
    s = pair_similarities(e, np.asarray(triplets))
    return (s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])


def expected_agreement(similarities: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(t,) float64: the probability that a person picks the pair the model finds most similar, per triplet.

    similarities: (t, 3) the model's [s01, s02, s12]; probs: (t, 3) the human response distribution over
    the same pairs. Its mean is the model's expected agreement with human choices (the AligNet paper's
    Levels metric; a person's own agreement with another is the mean of Σ p²)."""
    choice = np.argmax(np.asarray(similarities), axis=1)
    return np.asarray(probs, dtype=np.float64)[np.arange(len(choice)), choice]


def odd_one_out_accuracy(embeddings: np.ndarray, triplets: np.ndarray, similarity: str = "dot") -> float:
    """Fraction of human triplets (odd one in column 2) whose most similar pair is (0, 1).

    This is the zero-shot odd-one-out accuracy of the ICLR 2023 paper (chance 1/3). A tie for
    the largest similarity counts as wrong.
    """
    if len(triplets) == 0:
        return float("nan")
    return float(odd_one_out_correct(embeddings, triplets, similarity).mean())


def triplet_accuracy(student_sims: np.ndarray) -> float:
    """AligNet triplet accuracy: fraction of rows (teacher's odd one last) where the student's
    s01 is strictly largest. student_sims: (m, 3) [s01, s02, s12] in the dataset's row order."""
    s = np.asarray(student_sims)
    if len(s) == 0:
        return float("nan")
    return float(np.mean((s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])))


def cluster_agreement(labels: np.ndarray, assignments: np.ndarray) -> dict[str, float]:
    """NMI and ARI between reference labels (n,) and cluster assignments (n,).

    scikit-learn is imported here, not with the module: the stages that import this module (cluster,
    transform) then load on a GPU image without it (`make gpu-check`)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "nmi": float(normalized_mutual_info_score(labels, assignments)),
        "ari": float(adjusted_rand_score(labels, assignments)),
    }


# ----------------------------------------------------------------------------- stage 1 evaluation
def choice_probabilities_from_embeddings(embeddings: np.ndarray, triplets: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax([s01, s02, s12] / T) of dot products: (n, p) embeddings, (m, 3) triplets → (m, 3) float64."""
    s = pair_similarities(embeddings, triplets).astype(np.float64) / temperature
    q = np.exp(s - s.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True)


def choice_nll(probs: np.ndarray) -> float:
    """Mean negative log-probability of the observed choice: probs (n, 3) with the chosen pair in column 0."""
    p = np.asarray(probs, dtype=np.float64)
    return float(-np.mean(np.log(np.clip(p[:, 0], 1e-12, None)))) if len(p) else float("nan")


def expected_calibration_error(probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of predicted choice probabilities (chosen pair in column 0), top-label form.

    probs: (n, 3) predicted probabilities of the pairs [(t0, t1), (t0, t2), (t1, t2)], rows whose
    observed choice is column 0. Each row's confidence is its largest probability, correct when
    that is column 0; ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b| over `n_bins` equal-width
    confidence bins on [0, 1].
    """
    p = np.asarray(probs, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    conf = p.max(1)
    correct = (p.argmax(1) == 0).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def relative_accuracy(accuracy: float, ceiling: float) -> float:
    """Accuracy relative to a noise ceiling (acc / ceiling); with chance 1/3 both are raw accuracies."""
    if not ceiling > 0:
        raise ValueError(f"ceiling: expected a positive accuracy, got {ceiling}")
    return float(accuracy / ceiling)


def dissimilarity_matrix(embeddings: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(n, p) → (n, n) float64 dissimilarities: 1 − cosine similarity, or 'euclidean' distances."""
    e = np.asarray(embeddings, dtype=np.float64)
    if metric == "cosine":
        u = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
        return 1.0 - u @ u.T
    if metric == "euclidean":
        sq = (e**2).sum(1)
        return np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * e @ e.T, 0, None))
    raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")


def rsa(model_rdm: np.ndarray, reference_rdm: np.ndarray) -> float:
    """Representational similarity: Spearman correlation of the upper triangles (diagonal excluded)
    of two (n, n) dissimilarity matrices."""
    from scipy.stats import spearmanr

    a, b = np.asarray(model_rdm), np.asarray(reference_rdm)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"rsa: expected two (n, n) matrices with n >= 3, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    return float(spearmanr(a[iu], b[iu]).statistic)


def nearest_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """(n, p) → (n, k) int indices of each row's k nearest rows by cosine similarity (itself excluded),
    nearest first, equal similarities in index order: a stable sort's first k.

    A partial sort finds each row's k nearest (O(n) per row instead of a full sort's O(n log n): the
    sort was 70% of a 5,000-row overlap); a row with a tie at the k-th similarity is sorted in full,
    so the answer is the stable sort's exactly."""
    e = np.asarray(embeddings, dtype=np.float64)
    u = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
    neg = -(u @ u.T)
    np.fill_diagonal(neg, np.inf)
    n = len(neg)
    if not 0 < k < n:
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(neg, part, axis=1)
    out = np.take_along_axis(part, np.lexsort((part, vals), axis=-1), axis=1)
    tied = (neg <= vals.max(axis=1, keepdims=True)).sum(axis=1) > k  # another row as near as the k-th
    if tied.any():
        out[tied] = np.argsort(neg[tied], axis=1, kind="stable")[:, :k]
    return out


def knn_overlap(before: np.ndarray, after: np.ndarray, k: int = 10) -> float:
    """Local-structure score: mean over items of the fraction of their k nearest neighbours
    (cosine) in `before` (n, p) that are still among the k nearest in `after` (n, p')."""
    if len(before) != len(after):
        raise ValueError(f"knn_overlap: {len(before)} rows before, {len(after)} after")
    if not 0 < k < len(before):
        raise ValueError(f"k: expected 0 < k < {len(before)}, got {k}")
    a, b = nearest_neighbours(before, k), nearest_neighbours(after, k)
    return float(np.mean([len(np.intersect1d(r, s)) / k for r, s in zip(a, b)]))


def object_folds(
    n_objects: int, triplets: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-fold cross-validation over objects (ICLR 2023 probing protocol).

    Objects are split at random into n_folds folds; for each fold, the test triplets are those
    whose three objects all lie in the fold and the training triplets those with no object in it
    (mixed triplets are dropped). Returns [(train_rows, test_rows)] of int64 row indices into
    triplets. Deterministic for a seed.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds: expected at least 2, got {n_folds}")
    t = np.asarray(triplets)
    fold_of = np.empty(n_objects, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(n_objects)] = np.arange(n_objects) % n_folds
    f = fold_of[t]
    out = []
    for k in range(n_folds):
        inside = (f == k).sum(1)
        out.append((np.flatnonzero(inside == 0), np.flatnonzero(inside == 3)))
    return out


def linear_probe(
    objects: np.ndarray,
    triplets: np.ndarray,
    n_folds: int = 3,
    lam: float = 1e-3,
    lr: float = 1e-3,
    batch_size: int = 256,
    epochs: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, object]:
    """The linear probe of "Human alignment of neural network representations" (ICLR 2023).

    objects: (m, p) float embeddings; triplets: (n, 3) int, odd one in column 2. For each fold of
    `object_folds`, fit a full W ∈ R^{p×p} (init I) on the training triplets with
    cross-entropy that (t0, t1) is the most similar pair under softmax of the dot products of
    x W, plus lam · ‖W‖_F, by Adam (lr, batch_size, epochs); report zero-shot and probed
    accuracy on the fold's test triplets. Embeddings are standardized by one global mean/std.
    Returns {"zero_shot": [...], "probed": [...], "n_test": [...], "zero_shot_mean", "probed_mean"}.
    """
    import torch
    import torch.nn.functional as F

    x_np = np.asarray(objects, dtype=np.float64)
    x_np = (x_np - x_np.mean()) / (x_np.std() + 1e-12)
    t = np.asarray(triplets, dtype=np.int64)
    x = torch.as_tensor(x_np, dtype=torch.float32, device=device)
    p = x.shape[1]
    res: dict[str, list] = {"zero_shot": [], "probed": [], "n_test": []}
    gen = torch.Generator().manual_seed(int(seed))
    for train_rows, test_rows in object_folds(len(x_np), t, n_folds, seed):
        if len(train_rows) == 0 or len(test_rows) == 0:
            continue
        w = torch.nn.Parameter(torch.eye(p, device=device))
        opt = torch.optim.Adam([w], lr=lr)
        tr = torch.as_tensor(t[train_rows], device=device)
        for _ in range(epochs):
            perm = torch.randperm(len(tr), generator=gen).to(device)
            for start in range(0, len(tr), batch_size):
                b = tr[perm[start : start + batch_size]]
                z = x @ w
                a, bb, c = z[b[:, 0]], z[b[:, 1]], z[b[:, 2]]
                s = torch.stack([(a * bb).sum(1), (a * c).sum(1), (bb * c).sum(1)], 1)
                loss = F.cross_entropy(s, torch.zeros(len(b), dtype=torch.long, device=device))
                loss = loss + lam * torch.linalg.matrix_norm(w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        z_after = (x @ w).detach().cpu().numpy()
        res["zero_shot"].append(odd_one_out_accuracy(x_np, t[test_rows]))
        res["probed"].append(odd_one_out_accuracy(z_after, t[test_rows]))
        res["n_test"].append(int(len(test_rows)))
    out: dict[str, object] = dict(res)
    out["zero_shot_mean"] = float(np.mean(res["zero_shot"])) if res["zero_shot"] else float("nan")
    out["probed_mean"] = float(np.mean(res["probed"])) if res["probed"] else float("nan")
    return out

"""How well a model's uncertainty follows the human one on odd-one-out triplets.

The source paper's claim is that aligned models approximate human *uncertainty*, not only human
choices. Given, per triplet, the human choice distribution p and the model's q over the three pairs
[(0, 1), (0, 2), (1, 2)] (q = softmax of the model's pair similarities / T), this module reports:

- `nll`: the expected negative log-likelihood of a human choice under the model, −Σ_c p_c log q_c
  (the cross-entropy H(p, q); equal to −log q of the observed pair when p is one-hot);
- `jsd`: the Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, natural log (0 … ln 2);
- `entropy_spearman`: Spearman's rank correlation of the entropies H(p) and H(q) over triplets
  (does the model hesitate where people do?);
- `ece`: expected calibration error of q against the observed choices (column 0).
All are means over triplets (lower is better, except the correlation).
"""

from __future__ import annotations

import numpy as np

from alignet_core.errors import InputError
from alignet_core.records import Record
from alignet_core.stats.metrics import expected_calibration_error

_EPS = 1e-12


class UncertaintyAgreement(Record):
    """Agreement of the model's choice distributions with the human ones (see the module doc)."""

    nll: float
    jsd: float
    entropy_spearman: float
    ece: float
    n: int


def choice_distribution(similarities: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(similarities / T) row-wise: (t, 3) pair similarities → (t, 3) float64 probabilities."""
    s = np.asarray(similarities, dtype=np.float64) / temperature
    q = np.exp(s - s.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    """Row entropies (natural log) of (t, 3) distributions → (t,), with 0·log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    return -np.where(p > 0, p * np.log(np.clip(p, _EPS, None)), 0.0).sum(1)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * (np.log(np.clip(p, _EPS, None)) - np.log(np.clip(q, _EPS, None))), 0.0).sum(1)


def jsd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen–Shannon divergence (natural log) of two (t, 3) distributions → (t,)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2.0
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def uncertainty_agreement(human: np.ndarray, model: np.ndarray) -> UncertaintyAgreement:
    """Compare (t, 3) human choice probabilities with (t, 3) model probabilities, rows ordered so the
    observed choice is column 0. Rows must be distributions (non-negative, summing to 1)."""
    p, q = np.asarray(human, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"uncertainty: expected two (t, 3) arrays, got {p.shape} and {q.shape}")
    for name, x in (("human", p), ("model", q)):
        if len(x) and ((x < 0).any() or not np.allclose(x.sum(1), 1.0, atol=1e-4)):
            raise InputError(f"uncertainty: the {name} probabilities must be non-negative and sum to 1 per row")
    n = len(p)
    if n == 0:
        nan = float("nan")
        return UncertaintyAgreement(nll=nan, jsd=nan, entropy_spearman=nan, ece=nan, n=0)
    from scipy.stats import spearmanr

    hp, hq = entropy(p), entropy(q)
    # entropies that differ only by rounding have no ranking: no correlation to report
    rho = float(spearmanr(hp, hq).statistic) if np.ptp(hp) > 1e-9 and np.ptp(hq) > 1e-9 else float("nan")
    return UncertaintyAgreement(
        nll=float(-(p * np.log(np.clip(q, _EPS, None))).sum(1).mean()),
        jsd=float(jsd(p, q).mean()),
        entropy_spearman=rho,
        ece=expected_calibration_error(q),
        n=n,
    )


_TEMPERATURES = np.logspace(-4, 4, 81)


def fit_temperature(similarities: np.ndarray) -> float:
    """The T minimizing the NLL of the observed choices (column 0) under softmax(s / T), over a
    log grid from 1e-4 to 1e4. similarities: (t, 3)."""
    s = np.asarray(similarities, dtype=np.float64)
    nll = [-np.log(np.clip(choice_distribution(s, t)[:, 0], 1e-12, None)).mean() for t in _TEMPERATURES]
    return float(_TEMPERATURES[int(np.argmin(nll))])

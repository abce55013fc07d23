"""Dense soft-labelled triplets from every trial (issue 31's `human.densify`), on generated data with a
known answer: trials are drawn from VICE's own generative model (choices by softmax of dot products of a
sparse non-negative embedding), a few objects "have images", and the dense triplets over them must carry
the generator's choice probabilities. Real VICE (the fast setting), no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignet_core.config.human import ViceConfig
from alignet_core.errors import InputError
from alignet_core.human import densify as D
from alignet_core.human.triplets import observe

M, DIMS, N_TRIALS = 150, 5, 20_000


def _probs(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    a, b, c = x[t[:, 0]], x[t[:, 1]], x[t[:, 2]]
    s = np.stack([(a * b).sum(1), (a * c).sum(1), (b * c).sum(1)], 1)
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _world(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(0, 1, (M, DIMS)), 0) * 1.5
    drawn = D.distinct_triples(np.arange(M), N_TRIALS, rng)
    trials, _, _ = observe(drawn, _probs(x, drawn), rng)
    return x, trials


def test_dense_triplets_carry_the_generators_choice_probabilities():
    """Over 30 "imaged" objects (of 150), with ~130 trials naming three of them, the 5,000 dense triplets'
    probabilities follow the generator's. Bounds: a model without information scores correlation ~0 and
    argmax agreement 1/3; VICE on 20k trials measured corr 0.976-0.983, agreement 0.883-0.898, mean
    absolute error 0.029-0.042 over three seeds (the spread of a fit, not of rounding), so the bounds
    below sit well inside what a working fit gives and far from what a broken one gives."""
    x, trials = _world(0)
    pool = np.arange(30)
    out = D.densify(trials, M, pool, 5000, ViceConfig.fast(), seed=0, device=torch.device("cpu"))
    assert out.triplets.shape == (5000, 3) and np.isin(out.triplets, pool).all()
    assert (out.triplets[:, 0] != out.triplets[:, 1]).all() and (out.triplets[:, 1] != out.triplets[:, 2]).all()
    np.testing.assert_allclose(out.probs.sum(1), 1.0, atol=1e-5)
    truth = _probs(x, out.triplets)
    assert np.corrcoef(truth.ravel(), out.probs.ravel())[0, 1] > 0.93
    assert (truth.argmax(1) == out.probs.argmax(1)).mean() > 0.8
    assert np.abs(truth - out.probs).mean() < 0.08
    assert out.n_trials_fit == N_TRIALS and out.n_trials_dropped == 0
    # the sampled odd one (column 2) follows the probabilities: pair (t0, t1) is chosen as often as p says
    assert out.probs[:, 0].mean() > out.probs[:, 1].mean() and out.probs[:, 0].mean() > out.probs[:, 2].mean()


def test_an_excluded_objects_trials_never_reach_the_fit():
    """Every trial naming an excluded object is dropped before VICE sees it: changing those trials' answers
    leaves the fitted model bit-identical."""
    _, trials = _world(1)
    exclude = np.arange(120, 150)
    out = D.densify(trials, M, np.arange(30), 500, ViceConfig.fast(), seed=0, device=torch.device("cpu"),
                    exclude=exclude)
    naming = np.isin(trials, exclude).any(1)
    assert out.n_trials_dropped == int(naming.sum()) > 0 and out.n_trials_fit == int((~naming).sum())
    flipped = trials.copy()
    flipped[naming] = flipped[naming][:, [2, 1, 0]]  # other answers for every excluded trial
    again = D.densify(flipped, M, np.arange(30), 500, ViceConfig.fast(), seed=0, device=torch.device("cpu"),
                      exclude=exclude)
    np.testing.assert_array_equal(out.model.mu, again.model.mu)
    np.testing.assert_array_equal(out.probs, again.probs)


def test_bad_requests_are_refused_in_one_line():
    _, trials = _world(2)
    with pytest.raises(InputError, match="contains an excluded object"):
        D.densify(trials, M, np.arange(30), 10, ViceConfig.fast(), 0, torch.device("cpu"), exclude=np.arange(5))
    with pytest.raises(InputError, match="need at least 3 objects"):
        D.distinct_triples(np.arange(2), 5, np.random.default_rng(0))
    with pytest.raises(InputError, match="no trial is left"):
        D.densify(trials[:50], M, np.arange(3), 10, ViceConfig.fast(), 0, torch.device("cpu"),
                  exclude=np.unique(trials[:50]))

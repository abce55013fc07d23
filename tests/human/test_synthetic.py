"""The synthetic human generator: shapes, determinism, the choice convention and the ceiling."""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.stats.metrics import odd_one_out_accuracy
from alignet_core.synthetic import (
    ceiling_accuracy,
    choice_probabilities,
    make_synthetic_human,
)


def test_shapes_determinism_and_known_answer() -> None:
    a = make_synthetic_human(n_objects=60, n_triplets=3000, seed=3)
    b = make_synthetic_human(n_objects=60, n_triplets=3000, seed=3)
    c = make_synthetic_human(n_objects=60, n_triplets=3000, seed=4)
    assert a.features.shape == (60, 48) and a.features.dtype == np.float32
    assert a.triplets.shape == (3000, 3) and a.probs.shape == (3000, 3) and a.embedding.shape == (60, 10)
    assert np.array_equal(a.triplets, b.triplets) and np.array_equal(a.features, b.features)
    assert not np.array_equal(a.triplets, c.triplets)
    assert (a.embedding >= 0).all() and (a.embedding == 0).mean() > 0.4  # sparse, non-negative
    assert np.allclose(a.probs.sum(1), 1.0, atol=1e-5)
    # probs are the generating model's probabilities of the returned row's pairs
    assert np.allclose(a.probs, choice_probabilities(a.embedding, a.triplets), atol=1e-5)
    ceiling = ceiling_accuracy(a.probs)
    assert 0.6 < ceiling < 0.75  # like THINGS' 67%
    assert abs(ceiling - a.probs.max(1).mean()) < 0.03  # sampled choices agree with the model
    assert odd_one_out_accuracy(a.features, a.triplets) < ceiling - 0.15  # the teacher is far from it


def test_ceiling_counts_ties_fractionally_and_bad_args_fail() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.3, 0.5, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    assert ceiling_accuracy(p) == pytest.approx((1 + 0 + 1 / 3) / 3)
    with pytest.raises(InputError, match="n_concepts"):
        make_synthetic_human(n_concepts=20, signal_dims=12)

"""VICE on synthetic triplets with a known generating model: real fits, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignet_core.config.human import ViceConfig
from alignet_core.errors import InputError
from alignet_core.human.triplets import split_triplets
from alignet_core.human.vice import ViceModel, fit_vice, spike_and_slab_log_prior
from alignet_core.synthetic import ceiling_accuracy, make_synthetic_human

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted():
    s = make_synthetic_human(n_objects=60, n_concepts=6, n_triplets=9000, seed=5)
    tr, va = split_triplets(len(s.triplets), 0.15, seed=0)
    cfg = ViceConfig(init_dims=30, epochs=40, lr=0.03, batch_size=256)
    model = fit_vice(s.triplets[tr], s.n_objects, cfg, seed=0, device=CPU)
    return s, tr, va, model


def test_vice_recovers_held_out_accuracy_near_the_ceiling(fitted) -> None:
    s, _, va, model = fitted
    p = model.predict_probabilities(s.triplets[va], n_samples=25, seed=0)
    acc = float(np.mean((p[:, 0] > p[:, 1]) & (p[:, 0] > p[:, 2])))
    ceiling = ceiling_accuracy(s.probs[va])
    assert acc > ceiling - 0.05, (acc, ceiling)
    assert 1 <= model.dim < 30  # pruned from the initial dims
    assert (model.embedding() >= 0).all()


def test_predict_probabilities_convention_and_determinism(fitted) -> None:
    s, _, va, model = fitted
    t = s.triplets[va][:200]
    p = model.predict_probabilities(t, seed=1)
    assert p.shape == (200, 3) and p.dtype == np.float32
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(p, model.predict_probabilities(t, seed=1))
    # convention [(i,j), (i,k), (j,k)]: swapping i and j keeps p_ij and swaps p_ik with p_jk
    q = model.predict_probabilities(t[:, [1, 0, 2]], seed=1)
    assert np.allclose(q[:, 0], p[:, 0], atol=1e-6) and np.allclose(q[:, 1], p[:, 2], atol=1e-6)
    # moving k to the front: (k, i, j) has pairs [(k,i), (k,j), (i,j)] = [p_ik, p_jk, p_ij]
    r = model.predict_probabilities(t[:, [2, 0, 1]], seed=1)
    assert np.allclose(r, p[:, [1, 2, 0]], atol=1e-6)


def test_save_load_round_trip(fitted, tmp_path) -> None:
    s, _, va, model = fitted
    url = str(tmp_path / "vice" / "vice.safetensors")
    model.save(url)
    back = ViceModel.load(url)
    assert np.array_equal(back.mu, model.mu) and np.array_equal(back.log_sigma, model.log_sigma)
    assert back.info["kept_dims"] == model.info["kept_dims"]
    t = s.triplets[va][:50]
    assert np.array_equal(back.predict_probabilities(t, seed=2), model.predict_probabilities(t, seed=2))
    with pytest.raises(InputError, match="does not exist"):
        ViceModel.load(str(tmp_path / "missing.safetensors"))


def test_prior_and_bad_inputs() -> None:
    x = torch.tensor([0.0, 1.0])
    lp = spike_and_slab_log_prior(x, 0.5, 0.25, 1.0)
    dens = 0.5 * np.exp(-0.5 * (np.array([0.0, 1.0]) / 0.25) ** 2) / (0.25 * np.sqrt(2 * np.pi)) + 0.5 * np.exp(
        -0.5 * np.array([0.0, 1.0]) ** 2
    ) / np.sqrt(2 * np.pi)
    assert np.allclose(lp.numpy(), np.log(dens), atol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        fit_vice(np.array([[0, 1, 5]]), 3, ViceConfig(epochs=1), 0, CPU)


def test_vice_soft_targets_calibrate_the_transform_better_than_hard(fitted) -> None:
    """Uncertainty distillation end to end: VICE's posterior-predictive probabilities as soft
    targets give a transform with lower held-out NLL and ECE than the one-hot choices."""
    from alignet_core.config.transform import TransformConfig
    from alignet_core.stats.metrics import (
        choice_probabilities_from_embeddings,
        expected_calibration_error,
    )
    from alignet_core.transform.fit import fit_transform

    s, tr, va, model = fitted
    few = tr[:800]  # few triplets: the probabilities carry much more information than the choices
    p_few = model.predict_probabilities(s.triplets[few], seed=3)
    cfg = dict(alpha=0.0, epochs=20, patience=20, lr=1e-2, batch_size=128, lam=1e-3)
    stop = tr[800:1200]
    p_stop = model.predict_probabilities(s.triplets[stop], seed=4)
    soft = fit_transform(s.features, s.triplets[few], s.triplets[stop], TransformConfig(targets="soft", **cfg), 0, CPU,
                         p_few, p_stop)
    hard = fit_transform(s.features, s.triplets[few], s.triplets[stop], TransformConfig(targets="hard", **cfg), 0, CPU)
    truth = s.probs[va]

    def scores(r):
        q = choice_probabilities_from_embeddings(r.transform.apply(s.features), s.triplets[va])
        return float(-(truth * np.log(q + 1e-12)).sum(1).mean()), expected_calibration_error(q)

    (nll_soft, ece_soft), (nll_hard, ece_hard) = scores(soft), scores(hard)
    assert nll_soft < nll_hard - 0.01, (nll_soft, nll_hard)
    assert ece_soft < ece_hard, (ece_soft, ece_hard)


def test_bh_pruning_counts_match_benjamini_hochberg() -> None:
    """Per dimension, the number of objects rejected at FDR 0.05 equals scipy's BH-adjusted count."""
    from scipy.stats import false_discovery_control

    from alignet_core.human.vice import _bh_rejections

    p = np.array([[0.01, 0.04, 0.3], [0.02, 0.04, 0.2], [0.03, 0.04, 0.9], [0.5, 0.04, 0.8]])
    assert _bh_rejections(p, 0.05).tolist() == [3, 4, 0]  # step-up: p(4) = .04 ≤ 4·.05/4 passes all
    rng = np.random.default_rng(0)
    q = np.concatenate([rng.random((40, 6)), rng.random((10, 6)) * 1e-3])
    want = [(false_discovery_control(q[:, d], method="bh") <= 0.05).sum() for d in range(6)]
    assert _bh_rejections(q, 0.05).tolist() == want

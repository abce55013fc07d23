"""Cross-validation over objects and the (alpha, lam, lr) grid of the transform: real fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignet_core.config.transform import TransformConfig
from alignet_core.synthetic import make_synthetic_human
from alignet_core.transform.search import choose_setting, cross_validate_transform, grid_search_transform

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_synthetic_human(n_objects=100, n_triplets=24000, feature_dim=24, signal_dims=8, n_concepts=6, seed=7)


def _base(**kw) -> TransformConfig:
    return TransformConfig(**{**dict(lr=1e-2, epochs=10, batch_size=256, local_batch=100, lam=1e-3, patience=3), **kw})


def test_cross_validation_lifts_held_out_accuracy(data) -> None:
    cv = cross_validate_transform(data.features, data.triplets, _base(alpha=0.0, targets="hard"), 2, 0, CPU)
    assert len(cv["transformed"]) == 2 and all(n > 100 for n in cv["n_test"])
    assert cv["transformed_mean"] > cv["zero_shot_dot_mean"] + 0.06
    assert 0.0 <= cv["knn_overlap_mean"] <= 1.0


def test_grid_reports_every_setting_and_respects_the_knn_floor(data) -> None:
    g = grid_search_transform(
        data.features, data.triplets, _base(targets="soft"), alphas=[0.0, 0.5], lams=[1e-3], lrs=[1e-2],
        n_folds=2, seed=0, device=CPU, probs=data.probs, min_knn_overlap=None,
    )
    assert [(r["alpha"], r["lam"], r["lr"]) for r in g["settings"]] == [(0.0, 1e-3, 1e-2), (0.5, 1e-3, 1e-2)]
    by_alpha = {r["alpha"]: r for r in g["settings"]}
    assert by_alpha[0.5]["knn_overlap_mean"] > by_alpha[0.0]["knn_overlap_mean"]  # the local term keeps neighbours
    assert g["best"]["transformed_mean"] == max(r["transformed_mean"] for r in g["settings"])
    floor = by_alpha[0.5]["knn_overlap_mean"] - 1e-9
    # a floor that only alpha = 0.5 meets picks it; an unreachable floor falls back to all settings
    assert choose_setting(g["settings"], floor)["alpha"] == 0.5
    assert choose_setting(g["settings"], 2.0) == g["best"]
    assert np.isfinite(g["best"]["knn_overlap_mean"])

"""benchmarks/transform_batch.py: its score on hand cases, and a quick run end to end through the real
rotation fit (no timing asserted)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignet_core.stats.metrics import pair_similarities
from benchmarks.transform_batch import expected_accuracy, main


def test_pair_similarities_and_expected_accuracy_known_answers() -> None:
    z = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    t = np.array([[0, 1, 2], [2, 0, 1]])
    assert np.allclose(pair_similarities(z, t), [[1.0, 0.0, 0.1], [0.0, 0.1, 1.0]])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert expected_accuracy(z, t, p) == pytest.approx((0.7 + 0.6) / 2)  # both pick the likeliest pair
    bad = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])  # picks pair (0, 2), then pair (0, 1)
    assert expected_accuracy(bad, t, p) == pytest.approx((0.2 + 0.1) / 2)


def test_quick_run_scores_every_setting_below_the_ceiling() -> None:
    r = main(["--quick", "--settings", "256:0.003", "1024:0.006", "--no-write"])
    assert [f["batch_size"] for f in r["fits"]] == [256, 1024]
    assert 1 / 3 < r["zero_shot_expected_accuracy"] < r["ceiling"] <= 1
    for f in r["fits"]:
        assert 1 / 3 < f["expected_accuracy"] <= r["ceiling"]
        assert 1 <= f["epochs_run"] <= 2 and math.isfinite(f["stop_loss"]) and f["seconds"] > 0
    assert r["fits"][0]["seconds_vs_first"] == 1.0

"""benchmarks/vice.py times a real fit (small here; no timing is asserted, only that each figure is a
measurement and the fit's outcome is recorded)."""

from __future__ import annotations

import math

import numpy as np

from alignet_core.config.human import ViceConfig
from benchmarks.vice import fit_once


def test_fit_once_records_time_memory_and_the_stop() -> None:
    rng = np.random.default_rng(0)
    t = np.stack([rng.choice(12, 3, replace=False) for _ in range(600)])
    cfg = ViceConfig.fast(init_dims=6, epochs=30, burnin=5, stability_window=10, check_every=5)
    out = fit_once(t[100:], 12, cfg, threads=1, val=t[:100])
    assert out["n_triplets"] == 500 and out["n_objects"] == 12 and out["n_objects_with_triplets"] == 12
    assert math.isfinite(out["wall_s"]) and out["wall_s"] >= 0 and out["cpu_s"] >= 0
    assert 1 <= out["epochs_run"] <= 30 and isinstance(out["converged"], bool) and 1 <= out["dims"] <= 6
    if out["peak_rss_mib"] is not None:
        assert out["peak_rss_mib"] >= out["rss_before_fit_mib"] > 0
    assert 0 <= out["heldout_acc"] <= 1 and out["heldout_nll"] > 0

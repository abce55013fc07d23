"""The demo's human route end to end under Prefect's test harness: the shipped THINGS trials over 800 demo
emoji (108 of them show one of 98 mapped concepts), VICE per fold (a short fit: the route, not the figures, is
under test), the transform on dense triplets, sampling without the test fold's images, a few distillation
steps, and the evaluate stage scoring every model on the test fold against the people; `summary.json`
carries the `people` headline with intervals and `report.md` shows it first."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.alignet import alignet

pytestmark = pytest.mark.slow


def test_the_human_route_reports_every_model_against_the_people(tmp_path):
    overrides = {
        "root": str(tmp_path / "root"), "source.limit": 800, "embed.model": "tf_efficientnet_lite0",
        "embed.batch_size": 100,
        "human.shipped": "things", "human.densify": {"n_triplets": 3000, "n_test": 600}, "human.folds": 3,
        "vice.batch_size": None, "vice.lr": 0.1, "vice.init_dims": 12, "vice.epochs": 40, "vice.burnin": 10,
        "vice.stability_window": 20, "vice.check_every": 10, "vice.threads": 1,
        "transform.epochs": 4, "cluster.k": 5, "sample.n_train": 1200, "sample.n_valid": 300,
        "sample.shard_size": 400, "sample.n_workers": 2, "distill.steps": 4, "distill.batch_triplets": 8,
        "distill.warmup_steps": 1, "distill.checkpoint_every": 2, "distill.n_eval": 200, "distill.image_size": 64,
        "evaluate.n_per_level": 200,
    }
    with prefect_test_harness(server_startup_timeout=120):
        state = alignet(overrides=overrides, return_state=True)
        assert state.is_completed(), state
        s = state.result()
    assert s.human_data is not None and "densified by VICE" in s.human_data and "Hebart" in s.human_data
    p = s.people
    assert p is not None and p.n_objects >= 30 and p.n_triplets == 600
    assert set(p.expected) == {"teacher_raw", "teacher_aligned", "student_raw", "student_aligned"}
    for e in p.expected.values():
        assert e.unit == "objects" and 0 < e.low <= e.value <= e.high < 1
        assert e.value <= p.ceiling + 0.05
    assert set(p.changes) == {"teacher", "student"} and all(d.unit == "objects" for d in p.changes.values())
    assert "held-out" in p.heldout["teacher_aligned"]
    assert s.transform_expected is not None and s.transform_expected.n_objects == 98  # concepts of those 108 emoji
    assert s.transform_real is not None
    assert len(s.stage_keys) == 6  # the densify output is the transform's own, not a pipeline stage
    report = (Path(s.report_dir) / "report.md").read_text()
    assert report.index("Against the people") < report.index("| held-out accuracy (95% interval)")
    assert "teacher, human-aligned transform" in report and "AligNet-distilled" in report

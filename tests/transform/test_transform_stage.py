"""Stage 1 as the pipeline runs it on real (small) data: VICE soft targets when the human file
has no probabilities, the hyper-parameter search reporting every setting, and the
local-structure score, all recorded in the stage's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignet_core.config import parse_config, with_overrides
from alignet_core.context import RunContext
from alignet_core.embed.stage import run_embed
from alignet_core.human import vice
from alignet_core.human.data import load_human_data
from alignet_core.io import formats, sources
from alignet_core.transform.stage import run_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """90 demo emoji embedded by the packaged Lite0 (the stage's real input), and a THINGS-format
    triplet file of the proxy's choices without probabilities."""
    root = tmp_path_factory.mktemp("root")
    cfg = with_overrides(parse_config({}), {
        "root": str(root), "source.limit": 90, "embed.model": "tf_efficientnet_lite0", "embed.batch_size": 45,
        "human.proxy_n_triplets": 1500, "transform.epochs": 3, "transform.batch_size": 256,
        "transform.local_batch": 64, "vice.epochs": 8, "vice.init_dims": 20,
    })
    emb = run_embed(RunContext.of(cfg))
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    path = root / "things_triplets.txt"
    formats.write_things_triplets(str(path), data.triplets)
    return cfg, emb, str(path)


def test_vice_soft_targets_when_the_human_file_has_no_probabilities(base):
    cfg, emb, path = base
    cfg = with_overrides(cfg, {"human.triplets": path, "human.positional": True, "transform.targets": "soft"})
    out = run_transform(RunContext.of(cfg), emb)
    m = out.metrics.model_dump()
    assert m["soft_targets"] == "VICE posterior predictive"
    assert 1 / 3 < m["vice"]["val_acc"] <= 1.0 and 1 <= m["vice"]["dims"] <= 20
    model = vice.ViceModel.load(str(Path(out.dir) / "vice.safetensors"))
    assert model.n_objects == 90 and model.dim == m["vice"]["dims"]
    assert 0.0 <= m["knn_overlap"] <= 1.0 and m["knn_k"] == 10
    assert m["hyperparameters"]["targets"] == "soft" and len(m["history"]) >= 1

    # hard targets fit no VICE; the proxy's own probabilities are used when there are some
    hard = run_transform(RunContext.of(with_overrides(cfg, {"transform.targets": "hard"})), emb).metrics.model_dump()
    assert hard["soft_targets"] == "none (hard targets)" and hard["vice"] is None
    proxy = run_transform(RunContext.of(with_overrides(base[0], {"transform.targets": "soft"})), emb).metrics.model_dump()
    assert proxy["soft_targets"] == "proxy response model"


def test_search_reports_every_setting_and_fits_the_chosen_one(base):
    cfg, emb, _ = base
    cfg = with_overrides(cfg, {"transform.search_alphas": [0.0, 0.5], "transform.search_lrs": [0.003],
                               "transform.search_folds": 2})
    m = run_transform(RunContext.of(cfg), emb).metrics.model_dump()
    s = m["search"]
    assert s["n_folds"] == 2 and [(r["alpha"], r["lr"]) for r in s["settings"]] == [(0.0, 0.003), (0.5, 0.003)]
    assert all(0 <= r["transformed_mean"] <= 1 and 0 <= r["knn_overlap_mean"] <= 1 for r in s["settings"])
    best = max(s["settings"], key=lambda r: r["transformed_mean"])
    assert s["best"]["alpha"] == best["alpha"] == m["hyperparameters"]["alpha"]
    assert m["hyperparameters"]["lam"] == cfg.transform.lam  # not searched: the config's value


def test_reported_figures_are_on_held_out_objects_with_intervals(base):
    """The proxy run: every reported figure is on the test fold (objects no fit saw), with object-
    bootstrap intervals, per level, with the human-uncertainty agreement; the triplet-split figure
    is kept only as a labelled secondary line."""
    cfg, emb, _ = base
    out = run_transform(RunContext.of(cfg), emb)
    m = out.metrics
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    test_objects = set(data.triplets[data.split.test].ravel().tolist())
    assert all(data.fold_of[o] == cfg.human.test_fold for o in test_objects)
    h = m.heldout
    assert h.n_objects == len(test_objects) and h.transformed.n == len(data.split.test) == m.roles.test
    for est in (h.zero_shot, h.zero_shot_dot, h.transformed):
        assert est.unit == "objects" and est.low <= est.value <= est.high
    assert m.acc_before == h.zero_shot.value and m.acc_after == h.transformed.value
    assert h.gain.value == pytest.approx(h.transformed.value - h.zero_shot.value)
    assert "cosine" in h.zero_shot_protocol
    assert set(h.by_level) <= {"category_boundary", "sibling_boundary"} and h.by_level
    assert sum(lv.transformed.n for lv in h.by_level.values()) == h.transformed.n
    assert "training objects" in m.triplet_split.label and m.triplet_split.transformed.unit == "triplets"
    u = m.uncertainty
    assert u is not None and u.transformed.n == h.transformed.n and np.isfinite(u.transformed.nll)
    assert m.roles.train + m.roles.val + m.roles.test == m.n_triplets and m.roles.dropped == 0

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
from alignet_core.io import embedding_store, formats, sources
from alignet_core.transform import rotation
from alignet_core.transform.affine import AffineTransform
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
    formats.write_probabilities(str(path.with_suffix(".npy")), data.probs)
    return cfg, emb, str(path)


def test_vice_soft_targets_when_the_human_file_has_no_probabilities(base):
    cfg, emb, path = base
    cfg = with_overrides(cfg, {"human.triplets": path, "human.positional": True, "transform.targets": "soft"})
    out = run_transform(RunContext.of(cfg), emb)
    m = out.metrics.model_dump()
    assert m["soft_targets"] == rotation.SOFT_VICE and m["refit"]["soft_targets"] == rotation.SOFT_VICE_ALL
    assert 1 / 3 < m["vice"]["val_acc"] <= 1.0 and 1 <= m["vice"]["dims"] <= 20
    model = vice.ViceModel.load(str(Path(out.dir) / f"vice_fold_{cfg.human.test_fold}.safetensors"))
    assert model.n_objects == 90 - m["folds"][cfg.human.test_fold]["held_out_objects"]  # training objects only
    assert model.dim == m["vice"]["dims"]
    assert vice.ViceModel.load(str(Path(out.dir) / "vice_all.safetensors")).n_objects == 90
    assert all(f["vice_acc"] is not None for f in m["folds"])
    assert 0.0 <= m["knn_overlap"] <= 1.0 and m["knn_k"] == 10
    assert m["hyperparameters"]["targets"] == "soft" and len(m["history"]) >= 1

    # hard targets fit no VICE; the proxy's own probabilities are used when there are some
    hard = run_transform(RunContext.of(with_overrides(cfg, {"transform.targets": "hard"})), emb).metrics.model_dump()
    assert hard["soft_targets"] == rotation.SOFT_NONE and hard["vice"] is None
    proxy = run_transform(RunContext.of(with_overrides(base[0], {"transform.targets": "soft"})), emb).metrics.model_dump()
    assert proxy["soft_targets"] == rotation.SOFT_PROXY == "the proxy's generator (its response model)"
    given = with_overrides(cfg, {"human.probabilities": str(Path(path).with_suffix(".npy"))})
    assert run_transform(RunContext.of(given), emb).metrics.soft_targets == rotation.SOFT_GIVEN


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
    """The proxy run: the held-out figures pool every fold's test triplets (objects the fold's fit never
    saw), with object-resampling intervals, per level, with the human-uncertainty agreement; every
    object is tested once; per-fold counts; the triplet-split figure is a labelled secondary line."""
    cfg, emb, _ = base
    out = run_transform(RunContext.of(cfg), emb)
    m = out.metrics
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    h, r = m.heldout, m.rotation
    assert h.n_folds == cfg.human.folds == r.folds == len(m.folds)
    assert h.n_objects == data.n_objects  # the proxy is drawn inside each fold: every object is tested once
    assert h.transformed.n == r.test == sum(f.test_triplets for f in m.folds) == m.n_triplets  # every triplet
    for f in m.folds:
        sp = data.fold_split(f.fold)
        assert f.test_triplets == len(sp.test) and f.fit_triplets + f.stop_triplets == len(sp.train)
        assert f.partial_triplets == 0 and f.held_out_objects == int((data.fold_of == f.fold).sum())
        assert f.train_objects + f.held_out_objects == data.n_objects
    for est in (h.zero_shot, h.zero_shot_dot, h.transformed):
        assert est.unit == "objects" and est.low <= est.value <= est.high
    assert m.acc_before == h.zero_shot.value and m.acc_after == h.transformed.value
    assert h.gain.value == pytest.approx(h.transformed.value - h.zero_shot.value)
    assert "cosine" in h.zero_shot_protocol
    assert set(h.by_level) <= {"category_boundary", "sibling_boundary"} and h.by_level
    assert sum(lv.transformed.n for lv in h.by_level.values()) == h.transformed.n
    assert "training objects" in m.triplet_split.label and m.triplet_split.transformed.unit == "triplets"
    assert m.partial is None and r.partial == 0  # no proxy triplet spans two folds
    u = m.uncertainty
    assert u is not None and u.transformed.n == h.transformed.n and np.isfinite(u.transformed.nll)
    assert r.train_share == pytest.approx((cfg.human.folds - 1) / cfg.human.folds * 0.9, abs=0.01)
    assert r.trained_on == m.n_triplets


def test_the_store_holds_the_test_folds_fit_or_the_refit_on_all(base):
    """teacher 'heldout': the store's transform is the designated test fold's fit, saved beside the others
    and the refit; teacher 'all': the refit on every triplet, for the median kept epoch count."""
    cfg, emb, _ = base
    out = run_transform(RunContext.of(cfg), emb)
    m = out.metrics
    folder = Path(out.dir)
    store_fit = AffineTransform.load(str(folder / "transform.safetensors"))
    fold_fit = AffineTransform.load(str(folder / f"fold_{cfg.human.test_fold}.safetensors"))
    refit = AffineTransform.load(str(folder / "refit_all.safetensors"))
    assert m.teacher == "heldout" and f"fold {cfg.human.test_fold}" in m.teacher_fit
    assert store_fit.digest() == fold_fit.digest() != refit.digest()
    assert all((folder / f"fold_{f}.safetensors").exists() for f in range(cfg.human.folds))
    assert m.best_epoch == m.folds[cfg.human.test_fold].best_epoch
    assert m.refit.epochs == rotation.refit_epochs([f.best_epoch for f in m.folds])
    assert m.refit.n_triplets == m.n_triplets
    transformed = embedding_store.open_embeddings(out.artifact)["embeddings"][:5]
    raw = embedding_store.open_embeddings(emb.artifact)["embeddings"][:5]
    assert np.allclose(transformed, fold_fit.apply(raw), atol=1e-5)

    every = run_transform(RunContext.of(with_overrides(cfg, {"human.teacher": "all"})), emb)
    assert every.metrics.teacher == "all" and "refit on all" in every.metrics.teacher_fit
    assert AffineTransform.load(str(Path(every.dir) / "transform.safetensors")).digest() == AffineTransform.load(
        str(Path(every.dir) / "refit_all.safetensors")).digest()
    assert every.metrics.epochs_run == every.metrics.refit.epochs
    assert every.metrics.acc_after == m.acc_after  # the held-out figures do not depend on which fit is published

"""Stage 1 as the pipeline runs it on real (small) data: VICE soft targets when the human file
has no probabilities, the hyper-parameter search reporting every setting, and the
local-structure score, all recorded in the stage's metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignet_core.config import parse_config, with_overrides
from alignet_core.embed.stage import run_embed
from alignet_core.io import formats, sources
from alignet_core.transform import vice
from alignet_core.transform.human_data import load_human_data
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
    emb = run_embed(cfg)
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    path = root / "things_triplets.txt"
    formats.write_things_triplets(str(path), data.triplets)
    return cfg, emb, str(path)


def test_vice_soft_targets_when_the_human_file_has_no_probabilities(base):
    cfg, emb, path = base
    cfg = with_overrides(cfg, {"human.triplets": path, "transform.targets": "soft"})
    out = run_transform(cfg, emb)
    m = out.metrics.model_dump()
    assert m["soft_targets"] == "VICE posterior predictive"
    assert 1 / 3 < m["vice"]["val_acc"] <= 1.0 and 1 <= m["vice"]["dims"] <= 20
    model = vice.ViceModel.load(str(Path(out.dir) / "vice.safetensors"))
    assert model.n_objects == 90 and model.dim == m["vice"]["dims"]
    assert 0.0 <= m["knn_overlap"] <= 1.0 and m["knn_k"] == 10
    assert m["hyperparameters"]["targets"] == "soft" and len(m["history"]) >= 1

    # hard targets fit no VICE; the proxy's own probabilities are used when there are some
    hard = run_transform(with_overrides(cfg, {"transform.targets": "hard"}), emb).metrics.model_dump()
    assert hard["soft_targets"] == "none (hard targets)" and hard["vice"] is None
    proxy = run_transform(with_overrides(base[0], {"transform.targets": "soft"}), emb).metrics.model_dump()
    assert proxy["soft_targets"] == "proxy response model"


def test_search_reports_every_setting_and_fits_the_chosen_one(base):
    cfg, emb, _ = base
    cfg = with_overrides(cfg, {"transform.search_alphas": [0.0, 0.5], "transform.search_lrs": [0.003],
                               "transform.search_folds": 2})
    m = run_transform(cfg, emb).metrics.model_dump()
    s = m["search"]
    assert s["n_folds"] == 2 and [(r["alpha"], r["lr"]) for r in s["settings"]] == [(0.0, 0.003), (0.5, 0.003)]
    assert all(0 <= r["transformed_mean"] <= 1 and 0 <= r["knn_overlap_mean"] <= 1 for r in s["settings"])
    best = max(s["settings"], key=lambda r: r["transformed_mean"])
    assert s["best"]["alpha"] == best["alpha"] == m["hyperparameters"]["alpha"]
    assert m["hyperparameters"]["lam"] == cfg.transform.lam  # not searched: the config's value

"""benchmarks.alignment's object-disjoint figures (benchmarks/alignment_synthetic.py): computed on test-fold
objects only, with intervals."""

from __future__ import annotations

import numpy as np

from alignet_core.config.transform import TransformConfig
from alignet_core.config.human import ViceConfig
from alignet_core.synthetic import make_synthetic_human
from alignet_core.human import triplets as human
from benchmarks.alignment_synthetic import _object_disjoint


def test_object_disjoint_figures_use_only_held_out_objects(one_torch_thread) -> None:
    data = make_synthetic_human(n_objects=60, n_triplets=8000, seed=0)
    out = _object_disjoint(data, ViceConfig(epochs=3, init_dims=10), TransformConfig(epochs=2, batch_size=256,
                                                                                     local_batch=60), seed=0)
    fold_of = human.object_folds(60, 5, 0)
    sp = human.split_by_objects(data.triplets, fold_of, 0)
    assert out["n_test_triplets"] == len(sp.test) > 0 and out["n_objects_test"] == 12
    assert (fold_of[data.triplets[sp.test]] == 0).all()
    for key in ("ceiling", "zero_shot_cosine", "zero_shot_dot", "linear_oracle", "transformed"):
        e = out[key]
        assert e["unit"] == "objects" and e["n"] == len(sp.test) and e["low"] <= e["value"] <= e["high"], key
    assert np.isclose(out["gain"]["value"], out["transformed"]["value"] - out["zero_shot_cosine"]["value"])

"""Two short CPU training runs of the demo's student, one with a swap of `distill.train` and one without it, for
the tests that bound how far a swap may move a run (`test_depthwise`, `test_frozen_norm`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from alignet_core.config.distill import DistillConfig
from alignet_core.distill.train import train_student
from alignet_core.io import formats, sources
from tests.numerics import adam_divergence_bound


def run_pair(tmp_path: Path, monkeypatch, swap: str, **cfg_fields) -> tuple[dict, dict, float, float]:
    """Train Lite0 (32 px, 3 steps of 8 triplets over 40 demo emoji) as `train_student` does, then again with
    `alignet_core.distill.train.<swap>` replaced by a no-op. Returns both runs' results, the largest difference
    between their trained weights and what rounding-level gradient differences can do to Adam over those
    steps (`adam_divergence_bound`)."""
    demo = sources.demo_source()
    pool = sources.ImageSource(tuple(demo.records[:40]), "demo subset (40)")
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(40, 3, replace=False) for _ in range(64)])
    idx, sims, _ = formats.order_by_similarity(idx, rng.normal(size=(64, 3)).astype(np.float32))
    names = np.array([r.id for r in pool.records])[idx]
    split = formats.AlignetTriplets(indices=idx, filenames=names, similarities=sims)
    cfg = DistillConfig(student="tf_efficientnet_lite0", weights="packaged", image_size=32, head_dim=16, steps=3,
                        batch_triplets=8, lr=1e-3, warmup_steps=1, checkpoint_every=3, **cfg_fields)
    cpu = torch.device("cpu")
    fast = train_student(split, pool, cfg, str(tmp_path / "fast"), cpu, seed=0)
    monkeypatch.setattr(f"alignet_core.distill.train.{swap}", lambda model: 0)
    plain = train_student(split, pool, cfg, str(tmp_path / "plain"), cpu, seed=0)
    a, b = load_file(str(tmp_path / "fast" / "student.safetensors")), load_file(str(tmp_path / "plain" / "student.safetensors"))
    assert list(a) == list(b)
    lrs = [cfg.lr * f for f in (0.5, 1.0, 0.5)]  # warmup_cosine(1, 3) at steps 0, 1, 2
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    return fast, plain, worst, adam_divergence_bound(lrs)

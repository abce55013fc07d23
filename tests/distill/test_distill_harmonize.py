"""`distill.harmonize`: the AligNet loss plus the harmonizer's saliency term in the training loop, on
real demo emoji (their proxy maps) and a tiny real timm student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignet_core.config.distill import DistillConfig, HarmonizeConfig
from alignet_core.config import parse_config
from alignet_core.distill import harmonizer as H
from alignet_core.distill.stage import DistillFiles, plan_distill
from alignet_core.distill.train import train_student
from alignet_core.errors import ConfigError
from alignet_core.io import formats, sources
from alignet_core.distill.checkpoints import trajectory_of
from alignet_core.models.embedding import decode_images
from alignet_core.models.student import build_student, eval_transform


@pytest.fixture(scope="module")
def pool() -> sources.ImageSource:
    demo = sources.demo_source()
    pick = np.random.default_rng(3).choice(len(demo), 24, replace=False)
    return sources.ImageSource(tuple(demo.records[i] for i in np.sort(pick)), "demo subset (24)")


@pytest.fixture(scope="module")
def split(pool) -> formats.AlignetTriplets:
    g = np.random.default_rng(0)
    idx = np.stack([g.choice(len(pool), 3, replace=False) for _ in range(64)])
    sims = np.tile(np.array([[2.0, 0.0, -1.0]], np.float32), (64, 1))
    return formats.AlignetTriplets(idx, np.full(idx.shape, "", dtype=str), sims)


def _cfg(**kw) -> DistillConfig:
    base = dict(student="resnet10t", weights=None, head_dim=16, steps=4, batch_triplets=4, lr=1e-3, warmup_steps=1,
                checkpoint_every=2, image_size=32, harmonize=HarmonizeConfig(levels=3))
    return DistillConfig(**{**base, **kw})


def test_student_term_is_the_harmonization_term_of_the_classifier_saliency(pool, split):
    cfg = _cfg()
    student = build_student(cfg, 0).train()
    transform = eval_transform(student.backbone, 32)
    harm = H.training_harmonizer(cfg, split, pool, transform)
    assert harm is not None and harm.tokens.sum() == len(harm.rows)  # every emoji has an alpha channel
    rows = np.unique(split.indices[:4])
    images = decode_images([pool.records[int(r)].path for r in rows], transform)
    out, term = harm.forward(student, images, torch.from_numpy(rows))
    assert torch.allclose(out, student(images), atol=1e-5)
    labels = student.backbone(images).argmax(1)
    sal, _ = H.saliency(student.backbone, images, labels)
    want = H.harmonization_term(sal, harm.maps[np.searchsorted(harm.rows.numpy(), rows)], torch.ones(len(rows)), 3)
    assert term.item() == pytest.approx(want.item(), rel=1e-4)
    (g,) = torch.autograd.grad(term, student.backbone.conv1[0].weight)  # through the double backward
    assert g.abs().sum() > 0


def test_harmonized_training_runs_and_differs_from_plain(pool, split, tmp_path):
    cpu = torch.device("cpu")
    plain = train_student(split, pool, _cfg(harmonize=None, steps=2, checkpoint_every=100), str(tmp_path / "plain"), cpu,
                          seed=0)
    harm = train_student(split, pool, _cfg(steps=2, checkpoint_every=100), str(tmp_path / "harm"), cpu, seed=0)
    assert all(np.isfinite(harm["loss_curve"]))
    assert harm["trajectory"]["harmonize"] == {"weight": 1.0, "levels": 3, "maps": "proxy", "labels": "top1"}
    assert "harmonize" not in plain["trajectory"]
    # the saliency term adds to the loss from the first step
    assert harm["loss_curve"][0] > plain["loss_curve"][0]


def test_harmonize_config_checks_and_key():
    with pytest.raises(ConfigError, match="distill.harmonize: the harmonizer trains in one process"):
        parse_config({"distill": {"harmonize": {}, "devices": ["cpu", "cpu"]}})
    with pytest.raises(ConfigError, match="distill.compile"):
        parse_config({"distill": {"harmonize": {}, "compile": True}})
    with pytest.raises(ConfigError, match="distill.harmonize.weight"):
        parse_config({"distill": {"harmonize": {"weight": 0}}})
    off, on = parse_config({}), parse_config({"distill": {"harmonize": {"maps": "proxy"}}})
    files = DistillFiles(folder="/x", sampling="s", train="/x/train_s.npz", valid={}, key="k")
    assert plan_distill(off, files).key != plan_distill(on, files).key
    assert "harmonize" not in trajectory_of(off.distill, 0, "d")

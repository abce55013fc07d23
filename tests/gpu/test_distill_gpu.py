"""Distillation on a GPU: a run killed after a checkpoint resumes, in a new process, to the weights of an
uninterrupted run; the training really ran on the device (bf16 autocast there).

On a GPU the backward of the triplet gather (`index_put` with accumulation) adds in a varying order, so
two runs agree to rounding, not bit for bit: the resumed weights must lie within 1% of how far training
moved them (`RESUME_TOLERANCE`, in norms), the losses within 1e-3. On the CPU (dry run) both are exact
to the CPU test's tolerance (`tests/distill/test_distill.py`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignet_core.config.distill import DistillConfig
from alignet_core.distill.train import train_student
from alignet_core.io import formats, sources
from alignet_core.models.student import HEAD_FILE, STUDENT_FILE
from alignet_core.models.student import build_student
from tests.killed_distillation import run_until_killed

pytestmark = pytest.mark.gpu

RESUME_TOLERANCE = 0.01
CFG = DistillConfig(student="resnet10t", weights=None, head_dim=32, steps=6, batch_triplets=8, lr=1e-3,
                    warmup_steps=2, checkpoint_every=2, image_size=32)

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[sources.ImageSource, formats.AlignetTriplets, str]:
    """40 demo emoji and 300 random triplets over them in the official .npz format."""
    demo = sources.demo_source()
    pool = sources.ImageSource(demo.records[::47][:40], "demo subset")
    g = np.random.default_rng(1)
    idx = np.stack([g.choice(40, 3, replace=False) for _ in range(300)])
    idx, sims, _ = formats.order_by_similarity(idx, g.normal(size=(300, 3)).astype(np.float32) * 3)
    url = str(tmp_path_factory.mktemp("ds") / "train_cluster_border_12.npz")
    formats.write_alignet_npz(url, idx, pool.ids()[idx], sims.astype(np.float32))
    return pool, formats.read_alignet_npz(url, len(pool)), url


@pytest.mark.slow  # a second process starts, imports torch and initialises CUDA
def test_distillation_on_the_device_resumes_after_a_kill(device: torch.device, data, tmp_path: Path) -> None:
    pool, split, url = data
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    straight = train_student(split, pool, CFG, str(tmp_path / "straight"), device, seed=5)
    if device.type == "cuda":  # the student and its batches were on the GPU, not silently on the CPU
        params = sum(p.numel() * 4 for p in build_student(CFG, 5).parameters())
        assert torch.cuda.max_memory_allocated(device) > 3 * params

    out = tmp_path / "killed"
    spec = {"ids": [r.id for r in pool.records], "npz": url, "cfg": CFG.model_dump(), "out": str(out), "seed": 5,
            "kill_at": 5, "device": str(device)}
    proc = run_until_killed(spec)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / STUDENT_FILE).exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004"]

    resumed = train_student(split, pool, CFG, str(out), device, seed=5)
    np.testing.assert_allclose(resumed["loss_curve"], straight["loss_curve"], rtol=1e-3, atol=1e-6)
    init = build_student(CFG, 5)
    init_weights = {"student": init.backbone.state_dict(), "head": init.head.state_dict()}
    for part, name in (("student", STUDENT_FILE), ("head", HEAD_FILE)):
        got, want = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        assert got.keys() == want.keys()
        moved = torch.cat([(want[k].float() - init_weights[part][k].float()).ravel() for k in want]).norm()
        apart = torch.cat([(got[k].float() - want[k].float()).ravel() for k in want]).norm()
        assert moved > 0 and apart <= RESUME_TOLERANCE * moved, f"{name}: resumed is {apart / moved:.2e} of the training's move"

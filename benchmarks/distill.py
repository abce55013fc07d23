"""Distillation loop vs a bare PyTorch loop: training steps per second on the same student,
batches and in-memory data.

    python -m benchmarks.distill --quick    # demo student (EfficientNet-Lite0, 64 px), 16 triplets/step

Ours: `train_student` with `cache_images` (images decoded once, kept in memory), its
deterministic data order, DataLoader, AdamDecayToInit, warm-up/cosine schedule, NaN guard,
progress callback and a checkpoint halfway (a real run checkpoints every few hundred steps;
one checkpoint per 15 steps here is already far more often). Its step time is the
training-loop time the run logs (setup, the one-off decode and the final export excluded; they
are reported separately as `ours_wall_s`).
Bare: the loop a user would write: the same student (same initial weights), the same
pre-decoded image tensor and the same triplets per step, `alignet_loss`, `torch.optim.Adam`, no
scheduler, no checkpoints. Runs alternate (bare, ours, bare, ours, …) so load on a shared
machine hits both; each side's best run counts. `ratio` = ours steps/s ÷ bare steps/s (target
≥ 0.9); `ratio_of_medians` is the same from the median runs. Writes
`benchmarks/results/distill_quick.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from alignet_core.config import DistillConfig
from alignet_core.distill.batches import TripletBatches, decode_images
from alignet_core.distill.objective import alignet_loss, triplet_similarities
from alignet_core.distill.student import build_student, eval_transform
from alignet_core.distill.train import train_student
from alignet_core.io import formats, sources
from benchmarks._machine import machine_info, write_result


def _triplets(src: sources.ImageSource, n: int, seed: int) -> formats.AlignetTriplets:
    """Random triplets over the pool with random teacher similarities, odd one last."""
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(n)])
    idx, sims, _ = formats.order_by_similarity(idx, g.normal(size=(n, 3)).astype(np.float32))
    return formats.AlignetTriplets(idx, src.ids()[idx], sims.astype(np.float32))


def _bare_loop(cfg: DistillConfig, split: formats.AlignetTriplets, src: sources.ImageSource, seed: int) -> float:
    """Seconds for cfg.steps plain steps on pre-decoded images (setup excluded)."""
    student = build_student(cfg, seed).train()
    tf = eval_transform(student.backbone, cfg.image_size)
    batches = TripletBatches(split, src, tf, cfg.batch_triplets, seed)  # only for the same triplets per step
    used = np.unique(split.indices)
    slot = np.full(len(src), -1, dtype=np.int64)
    slot[used] = np.arange(len(used))
    images = decode_images([src.records[u].path for u in used], tf)
    sims_all = torch.from_numpy(split.similarities)
    plan = [batches.step_triplets(s) for s in range(cfg.steps)]
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    for ids in plan:
        rows = split.indices[ids]
        unique, inverse = np.unique(rows, return_inverse=True)
        x = images[torch.from_numpy(slot[unique])]
        opt.zero_grad(set_to_none=True)
        out = student(x)
        s = triplet_similarities(out, torch.from_numpy(inverse.reshape(rows.shape)))
        loss = alignet_loss(s, sims_all[torch.from_numpy(ids)], cfg.loss, cfg.tau)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def _our_loop(cfg: DistillConfig, split: formats.AlignetTriplets, src: sources.ImageSource, seed: int) -> tuple[float, float]:
    """(training-loop seconds as logged, wall seconds of the whole call) in a fresh directory."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        log = train_student(split, src, cfg, out, torch.device("cpu"), seed, progress=lambda s, l: None)
        return float(log["seconds"]), time.perf_counter() - t0


def run(steps: int, batch: int, image_size: int, repeats: int, n_images: int, seed: int = 0) -> dict:
    src = sources.subset(sources.demo_source(), n_images)
    split = _triplets(src, 4000, seed)
    cfg = DistillConfig(student="tf_efficientnet_lite0", weights="packaged", steps=steps, batch_triplets=batch,
               image_size=image_size, warmup_steps=max(1, steps // 10), lr=3e-4,
               checkpoint_every=max(1, steps // 2), cache_images=True)
    warm = DistillConfig(**{**cfg.model_dump(), "steps": 2, "checkpoint_every": 50})
    _bare_loop(warm, split, src, seed)  # first-call costs (allocator, kernels) out of the timings
    bare, ours, ours_wall = [], [], []
    for _ in range(repeats):
        bare.append(_bare_loop(cfg, split, src, seed))
        loop_s, wall_s = _our_loop(cfg, split, src, seed)
        ours.append(loop_s)
        ours_wall.append(wall_s)
    return {
        "benchmark": "distill",
        "student": cfg.student, "image_size": image_size, "batch_triplets": batch, "steps": steps,
        "checkpoint_every": cfg.checkpoint_every, "pool_images": n_images, "repeats": repeats,
        "device": "cpu", "torch_threads": torch.get_num_threads(),
        "bare_s": [round(x, 3) for x in bare],
        "ours_s": [round(x, 3) for x in ours],
        "ours_wall_s": [round(x, 3) for x in ours_wall],
        "bare_steps_per_s": round(steps / min(bare), 3),
        "ours_steps_per_s": round(steps / min(ours), 3),
        "ratio": round(min(bare) / min(ours), 3),
        "ratio_of_medians": round(float(np.median(bare) / np.median(ours)), 3),
        "target_ratio": 0.9,
        "torch": torch.__version__,
        "machine": machine_info(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 steps × 16 triplets at 64 px, alternating repeats")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    steps = args.steps or (30 if args.quick else 120)
    result = run(steps=steps, batch=16, image_size=64, repeats=args.repeats, n_images=600)
    write_result("distill_quick" if args.quick else "distill_full", result)


if __name__ == "__main__":
    main()

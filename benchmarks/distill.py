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

GPU mode (`--gpu`; writes `benchmarks/results/gpu/distill_gpu.json`): a ViT-B/16 student
(timm `vit_base_patch16_224`, random init, no download) at 224 px, bf16 autocast, the AligNet loss,
`--batch` triplets per step (default 128) over `--pool` demo images decoded once. Each loop runs
`--warmup` untimed steps, then `--steps` timed ones, on the same triplets per step:
- ours: `train_student` as a run uses it (`cache_images`, `--workers` DataLoader processes, pinned
  memory, AdamDecayToInit, schedule, NaN guard, one host sync per step for the loss); the time from
  the end of the last warm-up step to the end of the last step, from its progress callback; no
  checkpoint falls inside it (a real run writes one every few thousand steps);
- bare: the images held on the GPU, all index tensors made beforehand, `torch.optim.Adam`, no host
  sync until the end: the ceiling of a loop on these data.
`ratio` = ours ÷ bare steps/s (target ≥ 0.9). MFU = steps/s × training FLOPs per step ÷ the GPU's peak
dense bf16 FLOP/s (`benchmarks._machine.PEAK_BF16_DENSE`; `--peak-flops` for other GPUs); FLOPs per
step = forward + backward FLOPs per image (`torch.utils.flop_counter.FlopCounterMode`, `train_flops_per_image`)
× the mean number of distinct images per timed step (target ≥ 0.4). `--device cpu` runs the very same
code small (e.g. `--model test_vit --image-size 32 --batch 4 --steps 2`): printed, never written.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from alignet_core.config.distill import DistillConfig
from alignet_core.distill.batches import TripletBatches
from alignet_core.distill.objective import alignet_loss, triplet_similarities
from alignet_core.distill.train import train_student
from alignet_core.hardware import autocast_dtype
from alignet_core.io import formats, sources
from alignet_core.models.embedding import decode_images
from alignet_core.models.student import build_student, eval_transform
from benchmarks._machine import (
    check_gpu_device,
    machine_info,
    peak_bf16_flops,
    report_gpu_result,
    synchronize,
    write_result,
)

CPU = torch.device("cpu")


def _triplets(src: sources.ImageSource, n: int, seed: int) -> formats.AlignetTriplets:
    """Random triplets over the pool with random teacher similarities, odd one last."""
    g = np.random.default_rng(seed)
    idx = np.stack([g.choice(len(src), 3, replace=False) for _ in range(n)])
    idx, sims, _ = formats.order_by_similarity(idx, g.normal(size=(n, 3)).astype(np.float32))
    return formats.AlignetTriplets(idx, src.ids()[idx], sims.astype(np.float32))


def _bare_loop(cfg: DistillConfig, split: formats.AlignetTriplets, src: sources.ImageSource, seed: int,
               device: torch.device = CPU, warmup: int = 0) -> float:
    """Seconds for the last cfg.steps − `warmup` of cfg.steps plain steps on pre-decoded images held on
    `device` (setup and the first `warmup` steps excluded; the device is synchronized before both clocks).

    Every step's image rows, triplet rows and teacher similarities are index tensors made on `device`
    before the clock starts, so nothing in the loop waits for the host: it is the fastest loop a user
    with the same data in memory could write (bf16 autocast on GPUs, as ours)."""
    student = build_student(cfg, seed).to(device).train()
    tf = eval_transform(student.backbone, cfg.image_size)
    batches = TripletBatches(split, src, tf, cfg.batch_triplets, seed)  # only for the same triplets per step
    used = np.unique(split.indices)
    slot = np.full(len(src), -1, dtype=np.int64)
    slot[used] = np.arange(len(used))
    images = decode_images([src.records[u].path for u in used], tf).to(device)
    sims_all = torch.from_numpy(split.similarities).to(device)
    plan = []
    for s in range(cfg.steps):
        ids = batches.step_triplets(s)
        rows = split.indices[ids]
        unique, inverse = np.unique(rows, return_inverse=True)
        plan.append(tuple(torch.from_numpy(a).to(device) for a in (slot[unique], inverse.reshape(rows.shape), ids)))
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    amp = autocast_dtype(device)
    t0 = time.perf_counter()
    for step, (image_rows, triplet_rows, ids) in enumerate(plan):
        if step == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = student(images[image_rows])
        loss = alignet_loss(triplet_similarities(out, triplet_rows), sims_all[ids], cfg.loss, cfg.tau)
        loss.backward()
        opt.step()
    synchronize(device)
    return time.perf_counter() - t0


def _our_loop(cfg: DistillConfig, split: formats.AlignetTriplets, src: sources.ImageSource, seed: int,
              device: torch.device = CPU, warmup: int = 0) -> tuple[float, float]:
    """(training-loop seconds, wall seconds of the whole call) of `train_student` in a fresh directory.

    warmup 0: the loop's time as the run logs it. Else the time from the end of step `warmup` to the end
    of the last step, stamped by the progress callback (called after each step's loss reached the host)."""
    stamps: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        log = train_student(split, src, cfg, out, device, seed, progress=lambda s, _l: stamps.__setitem__(s, time.perf_counter()))
        wall = time.perf_counter() - t0
    if warmup == 0:
        return float(log["seconds"]), wall
    return stamps[cfg.steps] - stamps[warmup], wall


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


# ----------------------------------------------------------------------------- GPU mode
GPU_STUDENT = "vit_base_patch16_224"
#: the targets for the ViT-B/16 student on one GPU
TARGET_MFU, TARGET_RATIO = 0.4, 0.9


def train_flops_per_image(cfg: DistillConfig, seed: int, device: torch.device, batch: int = 4) -> float:
    """FLOPs of one training step (forward and backward, no recompute) per image of the student of `cfg`,
    counted by `torch.utils.flop_counter.FlopCounterMode` on a random batch of `batch` images under the
    loop's autocast. The triplet head's dot products and the loss are left out (< 1e-4 of the total)."""
    from torch.utils.flop_counter import FlopCounterMode

    student = build_student(cfg, seed).to(device).train()
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed)).to(device)
    amp = autocast_dtype(device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = student(x)
        out.float().square().mean().backward()
    return counter.get_total_flops() / batch


def mean_unique_images(cfg: DistillConfig, split: formats.AlignetTriplets, src: sources.ImageSource, seed: int,
                       steps: range) -> float:
    """Mean number of distinct images per step over `steps` (the images each step runs forward and backward)."""
    batches = TripletBatches(split, src, lambda img: img, cfg.batch_triplets, seed)
    return float(np.mean([len(np.unique(split.indices[batches.step_triplets(s)])) for s in steps]))


def run_gpu(args: argparse.Namespace, seed: int = 0) -> dict:
    """Our loop vs the bare loop on a GPU (see the module doc): steps/s, their ratio, MFU of each."""
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_flops or (peak_bf16_flops(name) if device.type == "cuda" else None)
    src = sources.subset(sources.demo_source(), args.pool)
    split = _triplets(src, 4000, seed)
    steps = args.warmup + args.steps
    cfg = DistillConfig(student=args.model, weights=None, image_size=args.image_size, steps=steps,
                        batch_triplets=args.batch, warmup_steps=args.warmup, lr=3e-5, checkpoint_every=steps,
                        cache_images=True, num_workers=args.workers, compile=args.compile)
    flops_image = train_flops_per_image(cfg, seed, device)
    images_step = mean_unique_images(cfg, split, src, seed, range(args.warmup, steps))
    bare, ours, ours_wall = [], [], []
    for _ in range(args.repeats):  # alternating, so a slow phase hits both
        bare.append(_bare_loop(cfg, split, src, seed, device, args.warmup))
        loop_s, wall_s = _our_loop(cfg, split, src, seed, device, args.warmup)
        ours.append(loop_s)
        ours_wall.append(wall_s)
    bare_rate, ours_rate = args.steps / min(bare), args.steps / min(ours)
    flops_step = flops_image * images_step

    def mfu(rate: float) -> float | None:
        return round(rate * flops_step / peak, 4) if peak else None

    machine = machine_info()
    machine.update({"torch": torch.__version__, "device_name": name, "cuda": torch.version.cuda,
                    "torch_threads": torch.get_num_threads()})
    result = {
        "benchmark": "distill_gpu",
        "device": str(device),
        "student": cfg.student, "weights": None, "image_size": cfg.image_size, "head_dim": cfg.head_dim,
        "precision": "bf16 autocast" if autocast_dtype(device) is not None else "float32 (no autocast on this device)",
        "compile": cfg.compile, "loss": cfg.loss,
        "batch_triplets": cfg.batch_triplets, "pool_images": args.pool, "mean_images_per_step": round(images_step, 1),
        "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats, "num_workers": args.workers,
        "ours_data": "train_student with cache_images: images decoded once into host memory, each step's images "
                     "gathered by the DataLoader workers, pinned, copied to the device",
        "bare_data": "the same decoded images held on the device, every step's index tensors made there beforehand",
        "train_flops_per_image": flops_image, "train_flops_per_step": flops_step, "peak_bf16_flops": peak,
        "bare_s": [round(x, 3) for x in bare], "ours_s": [round(x, 3) for x in ours],
        "ours_wall_s": [round(x, 3) for x in ours_wall],
        "bare_steps_per_s": round(bare_rate, 3), "ours_steps_per_s": round(ours_rate, 3),
        "ratio": round(ours_rate / bare_rate, 3), "target_ratio": TARGET_RATIO,
        "meets_ratio_target": ours_rate / bare_rate >= TARGET_RATIO,
        "bare_mfu": mfu(bare_rate), "ours_mfu": mfu(ours_rate), "target_mfu": TARGET_MFU,
        "meets_mfu_target": (ours_rate * flops_step / peak >= TARGET_MFU) if peak else None,
        "ours_images_per_s": round(ours_rate * images_step, 1),
        "machine": machine,
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 steps × 16 triplets at 64 px, alternating repeats")
    p.add_argument("--gpu", action="store_true", help=f"{GPU_STUDENT} at 224 px, bf16, on a CUDA GPU (see the doc)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 quick, 120 full, 30 --gpu)")
    p.add_argument("--repeats", type=int, default=None, help="alternating runs of each loop (default 5; --gpu 2)")
    p.add_argument("--device", default="cuda", help="--gpu: 'cuda' / 'cuda:<i>', or 'cpu' for a dry run of the "
                   "same code (printed, never written as a result)")
    p.add_argument("--model", default=GPU_STUDENT, help="--gpu: the student (random init)")
    p.add_argument("--image-size", type=int, default=224, help="--gpu: input pixels")
    p.add_argument("--batch", type=int, default=128, help="--gpu: triplets per step")
    p.add_argument("--pool", type=int, default=600, help="--gpu: demo images the triplets draw from")
    p.add_argument("--warmup", type=int, default=5, help="--gpu: untimed steps first (allocator, kernels' first use)")
    p.add_argument("--workers", type=int, default=None, help="--gpu: our loop's DataLoader workers (default: "
                   "min(8, cores))")
    p.add_argument("--compile", action="store_true", help="--gpu: distill.compile (torch.compile the student)")
    p.add_argument("--peak-flops", type=float, default=None, help="--gpu: peak dense bf16 FLOP/s (default: from "
                   "the GPU's name, benchmarks._machine.PEAK_BF16_DENSE)")
    args = p.parse_args(argv)
    if args.gpu:
        check_gpu_device(p, args.device, "--gpu --device cpu --model test_vit --image-size 32 --batch 4 --steps 2")
        args.steps = args.steps or 30
        args.repeats = args.repeats or 2
        args.workers = args.workers if args.workers is not None else min(8, len(os.sched_getaffinity(0)))
        report_gpu_result("distill_gpu", run_gpu(args), args.device)
        return
    steps = args.steps or (30 if args.quick else 120)
    result = run(steps=steps, batch=16, image_size=64, repeats=args.repeats or 5, n_images=600)
    write_result("distill_quick" if args.quick else "distill_full", result)


if __name__ == "__main__":
    main()

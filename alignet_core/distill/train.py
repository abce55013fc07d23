"""Stage 4's training loop: finetune the student with the AligNet loss, resumable from its
checkpoints on exactly the trajectory of an uninterrupted run.

The pieces are in their own modules: the student (`student`), the loss and decay-to-init
optimizer (`objective`), the batches (`batches`), checkpoints and outputs (`checkpoints`) and
the evaluation (`evaluation`); `stage` runs them as the pipeline's stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from alignet_core.config import DistillConfig
from alignet_core.distill.batches import TripletBatches, loader
from alignet_core.distill.checkpoints import (
    CHECKPOINT_DIR,
    HEAD_FILE,
    LOG_FILE,
    STUDENT_FILE,
    data_fingerprint,
    list_checkpoints,
    load_checkpoint,
    read_train_log,
    save_checkpoint,
    save_safetensors_atomic,
    trajectory_of,
    write_json_atomic,
)
from alignet_core.distill.objective import AdamDecayToInit, alignet_loss, triplet_similarities, warmup_cosine
from alignet_core.distill.student import build_student, eval_transform, input_size
from alignet_core.errors import ConfigError, StoreError
from alignet_core.hardware import autocast_dtype
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource

log = logging.getLogger(__name__)


def train_student(
    train: AlignetTriplets,
    source: ImageSource,
    cfg: DistillConfig,
    out_dir: str,
    device: torch.device,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Finetune `cfg.student` on the training triplets; resumable, deterministic in (seed, step).

    train: the split (indices (n, 3) rows into `source`, similarities (n, 3) [s01, s02, s12],
    image 2 the odd one out); source: the image pool (`ImageSource`, row i = records[i]);
    cfg: the run's `DistillConfig`; out_dir: a local directory.

    Trains cfg.steps Adam-with-decay-to-init steps of cfg.batch_triplets triplets (in
    cfg.grad_accum micro-batches), bf16 autocast on GPUs only, the forward pass optionally
    `torch.compile`d (cfg.compile), checkpointing every
    cfg.checkpoint_every steps to out_dir/checkpoints/step_<n>/ (atomic directory rename; the
    newest is kept). A run that was killed resumes from its newest checkpoint on the same
    trajectory. At the end writes out_dir/student.safetensors (the backbone's timm state dict),
    out_dir/head.safetensors ('weight' (head_dim, p), 'bias' (head_dim,)) and, last,
    out_dir/train_log.json. If out_dir already holds a finished run of the same trajectory its
    log is returned without training. `progress(step, loss)` is called after each step.

    Returns {"steps", "final_loss", "loss_curve" (per step), "seconds" (training time summed
    over resumes), ...}.
    """
    if not isinstance(out_dir, str) or ("://" in out_dir and not out_dir.startswith("file://")):
        raise StoreError(f"distill output {out_dir!r}: training checkpoints need a local directory")
    out_dir = out_dir.removeprefix("file://")
    if cfg.batch_triplets % cfg.grad_accum:
        raise ConfigError(
            f"distill.batch_triplets ({cfg.batch_triplets}) must be a multiple of distill.grad_accum ({cfg.grad_accum})"
        )
    data_key = data_fingerprint(train, len(source))
    trajectory = trajectory_of(cfg, seed, data_key)
    done = read_train_log(out_dir)
    if done is not None:
        if done.get("trajectory") != json.loads(json.dumps(trajectory, default=str)):
            raise StoreError(
                f"{out_dir!r} holds a finished distillation run with another config, seed or dataset; "
                "use a new output directory"
            )
        log.info("distill: %s already holds a finished run; reusing it", out_dir)
        return done

    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith(".tmp-"):  # debris of a checkpoint write that was killed
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)

    student = build_student(cfg, seed).to(device).train()
    opt = AdamDecayToInit(student.parameters(), lr=cfg.lr, decay_to_init=cfg.decay_to_init)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    start, history, seconds = 0, [], 0.0
    ckpts = list_checkpoints(ckpt_dir)
    if ckpts:
        _, path = ckpts[-1]
        weights, state = load_checkpoint(path)
        if state.get("trajectory") != json.dumps(trajectory, sort_keys=True, default=str):
            raise StoreError(
                f"checkpoint {path!r} was made with another config, seed or dataset; "
                "remove it or use a new output directory"
            )
        student.load_state_dict(weights, strict=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start, history, seconds = int(state["step"]), list(state["loss_history"]), float(state["seconds"])
        log.info("distill: resuming from %s (step %d of %d)", path, start, cfg.steps)

    transform = eval_transform(student.backbone, student.image_size)
    batches = TripletBatches(train, source, transform, cfg.batch_triplets, seed, cfg.grad_accum,
                             cache=cfg.cache_images)
    amp = autocast_dtype(device)
    forward = torch.compile(student) if cfg.compile else student  # same parameters
    t_last = time.perf_counter()
    micro = iter(())
    if start < cfg.steps:
        micro = loader(
            batches, range(start * cfg.grad_accum, cfg.steps * cfg.grad_accum), cfg.num_workers, device
        )
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            images, rows, sims, _ids = next(micro)
            images = images.to(device, non_blocking=True)
            rows, sims = rows.to(device), sims.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = forward(images)
            loss = alignet_loss(triplet_similarities(out, rows), sims, cfg.loss, cfg.tau)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise ConfigError(f"distill.lr: the loss became {step_loss} at step {step + 1}; use a lower learning rate")
        opt.step()
        sched.step()
        history.append(step_loss)
        if progress is not None:
            progress(step + 1, step_loss)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            now = time.perf_counter()
            seconds += now - t_last
            t_last = now
            save_checkpoint(ckpt_dir, step + 1, student, opt, sched, history, seconds, trajectory)
            log.debug("distill: checkpoint at step %d, loss %.5f", step + 1, step_loss)
    seconds += time.perf_counter() - t_last

    student.eval()
    save_safetensors_atomic(student.backbone.state_dict(), os.path.join(out_dir, STUDENT_FILE))
    save_safetensors_atomic(student.head.state_dict(), os.path.join(out_dir, HEAD_FILE))
    if cfg.steps > start or not ckpts:
        save_checkpoint(ckpt_dir, cfg.steps, student, opt, sched, history, seconds, trajectory)
    result = {
        "complete": True,
        "steps": int(cfg.steps),
        "final_loss": float(history[-1]) if history else float("nan"),
        "loss_curve": [float(x) for x in history],
        "seconds": round(seconds, 3),
        "student": cfg.student,
        "image_size": student.image_size,
        "input_size": list(input_size(student)),
        "trajectory": json.loads(json.dumps(trajectory, default=str)),
    }
    write_json_atomic(os.path.join(out_dir, LOG_FILE), result)
    log.info("distill: %d steps in %.1f s, final loss %.5f", cfg.steps, seconds, result["final_loss"])
    return result



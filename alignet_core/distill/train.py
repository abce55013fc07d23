"""Stage 4's training loop: finetune the student with the AligNet loss, resumable from its
checkpoints on exactly the trajectory of an uninterrupted run.

The pieces are in their own modules: the student (`student`), the loss and decay-to-init
optimizer (`objective`), the batches (`batches`), checkpoints and outputs (`checkpoints`), the
data-parallel arithmetic (`parallel`), the ranks' launcher (`launch`) and the evaluation
(`evaluation`); `stage` runs them as the pipeline's stage. The same loop runs in one process or on
every rank of a torch.distributed process group.
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

import numpy as np
import torch

from alignet_core.config.distill import DistillConfig
from alignet_core.distill.batches import TripletBatches
from alignet_core.distill.checkpoints import (
    CHECKPOINT_DIR,
    data_fingerprint,
    finished_run,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_safetensors_atomic,
    trajectory_of,
    write_json_atomic,
)
from alignet_core.distill.harmonizer import training_harmonizer
from alignet_core.distill.micro_batches import check_micro_batches
from alignet_core.distill.objective import AdamDecayToInit, alignet_loss, triplet_similarities, warmup_cosine
from alignet_core.distill.parallel import (
    RankMicroBatches,
    accumulating,
    barrier,
    current_world,
    data_parallel,
    from_writer,
    mean_over_ranks,
)
from alignet_core.errors import ConfigError, StoreError
from alignet_core.hardware import autocast_dtype
from alignet_core.io.formats import AlignetTriplets
from alignet_core.io.sources import ImageSource
from alignet_core.models.depthwise import use_fast_depthwise_grad
from alignet_core.models.embedding import loader
from alignet_core.models.frozen_norm import use_fast_frozen_norm
from alignet_core.models.partial import freeze_front, front_outputs
from alignet_core.models.student import HEAD_FILE, LOG_FILE, STUDENT_FILE, build_student, eval_transform, input_size

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
    cfg: the run's `DistillConfig`; out_dir: a local directory (shared by all ranks).

    With cfg.train_blocks the student's front is frozen and run once per training image, and only its
    last blocks, head layers and triplet head train (`models.partial`).

    Trains cfg.steps Adam-with-decay-to-init steps of cfg.batch_triplets triplets (in
    cfg.grad_accum micro-batches), bf16 autocast on GPUs only, the forward pass optionally
    `torch.compile`d (cfg.compile), checkpointing every
    cfg.checkpoint_every steps to out_dir/checkpoints/step_<n>/ (atomic directory rename; the
    newest is kept). A run that was killed resumes from its newest checkpoint on the same
    trajectory. At the end writes out_dir/student.safetensors (the backbone's timm state dict),
    out_dir/head.safetensors ('weight' (head_dim, p), 'bias' (head_dim,)) and, last,
    out_dir/train_log.json. If out_dir already holds a finished run of the same trajectory its
    log is returned without training. `progress(step, loss)` is called after each step.

    Data-parallel: called on every rank of an initialised torch.distributed process group (the
    ranks `launch` starts under torchrun), each with its own `device`, the N ranks train on the same
    global batch of cfg.batch_triplets triplets per step: rank r computes its cfg.grad_accum
    micro-batches of the step's N·grad_accum (`parallel`), DDP averages the gradients, and every rank
    takes the same optimizer step. Rank 0 alone creates out_dir and writes every file (checkpoints,
    exports, the log); it also decides, for every rank, whether the run is finished and which
    checkpoint to resume from, so a run killed on any rank resumes on every rank at the same step.
    `progress` is called on every rank with the step's mean loss over the global batch.

    Returns {"steps", "final_loss", "loss_curve" (per step), "seconds" (training time summed
    over resumes), "cpu_seconds" (the CPU time of this process's threads over the same loops: rank 0's
    on several ranks), "ranks", ...}.
    """
    if not isinstance(out_dir, str) or ("://" in out_dir and not out_dir.startswith("file://")):
        raise StoreError(f"distill output {out_dir!r}: training checkpoints need a local directory")
    out_dir = out_dir.removeprefix("file://")
    world = current_world()
    check_micro_batches(cfg.batch_triplets, cfg.grad_accum, world.size)
    data_key = data_fingerprint(train, len(source))
    trajectory = trajectory_of(cfg, seed, data_key)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)

    def finished_or_newest_checkpoint() -> tuple[dict[str, Any] | None, str | None]:
        """On the writer: (the finished run's log, None) or (None, the checkpoint to resume from, if any)."""
        done = finished_run(out_dir, trajectory)
        if done is not None:
            return done, None
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
            if name.startswith(".tmp-"):  # debris of a checkpoint write that was killed
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        ckpts = list_checkpoints(ckpt_dir)
        return None, ckpts[-1][1] if ckpts else None

    done, resume = from_writer(finished_or_newest_checkpoint, world)
    if done is not None:
        log.info("distill: %s already holds a finished run; reusing it", out_dir)
        return done

    student = build_student(cfg, seed).to(device).train()
    if device.type == "cpu" and cfg.harmonize is None and not cfg.compile:  # the harmonizer differentiates twice
        use_fast_depthwise_grad(student)  # oneDNN's depthwise weight gradients were most of a CPU step
        use_fast_frozen_norm(student)  # torch's CPU backward of a frozen BatchNorm is slow on small maps
    trained: torch.nn.Module = student
    encode = None
    if cfg.train_blocks is not None:  # the front frozen (before the optimizer sees which parameters train)
        trained, front = freeze_front(student, cfg.train_blocks)
        encode = lambda images: front_outputs(front, images, device)  # noqa: E731
    opt = AdamDecayToInit(student.parameters(), lr=cfg.lr, decay_to_init=cfg.decay_to_init)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    start, history, seconds, cpu_seconds = 0, [], 0.0, 0.0
    if resume is not None:
        weights, state = load_checkpoint(resume)
        if state.get("trajectory") != json.dumps(trajectory, sort_keys=True, default=str):
            raise StoreError(
                f"checkpoint {resume!r} was made with another config, seed or dataset; "
                "remove it or use a new output directory"
            )
        student.load_state_dict(weights, strict=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start, history, seconds = int(state["step"]), list(state["loss_history"]), float(state["seconds"])
        cpu_seconds = float(state.get("cpu_seconds", 0.0))
        made_by = int(state.get("ranks", 1))
        log.info("distill: rank %d resuming from %s (step %d of %d%s)", world.rank, resume, start, cfg.steps,
                 "" if made_by == world.size else
                 f"; made by {made_by} ranks, continued by {world.size}: the same steps up to reduction order")

    transform = eval_transform(student.backbone, student.image_size)
    harmonizer = training_harmonizer(cfg, train, source, transform)
    # the step's triplets in world.size·grad_accum micro-batches; this rank computes its grad_accum of them
    batches = TripletBatches(train, source, transform, cfg.batch_triplets, seed, cfg.grad_accum * world.size,
                             cache=cfg.cache_images, encode=encode)
    amp = autocast_dtype(device)
    model = data_parallel(trained, device, world)
    forward = torch.compile(model) if cfg.compile else model  # same parameters
    t_last, cpu_last = time.perf_counter(), time.process_time()
    micro = iter(())
    if start < cfg.steps:
        mine = RankMicroBatches(start, cfg.steps, cfg.grad_accum, world.rank, world.size)
        micro = loader(batches, mine, cfg.num_workers, device)
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for j in range(cfg.grad_accum):
            images, rows, sims, _ids = next(micro)
            images = images.to(device, non_blocking=True)
            rows, sims = rows.to(device), sims.to(device)
            with accumulating(model, last=j == cfg.grad_accum - 1):  # ranks all-reduce once per step
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    if harmonizer is None:
                        out = forward(images)
                    else:  # one process (config-checked): the student itself, with its saliency term
                        pool_rows = torch.from_numpy(np.unique(batches.indices[_ids.numpy()]))
                        out, term = harmonizer.forward(student, images, pool_rows)
                loss = alignet_loss(triplet_similarities(out, rows), sims, cfg.loss, cfg.tau)
                if harmonizer is not None:
                    loss = loss + cfg.harmonize.weight * term  # type: ignore[union-attr]
                (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        step_loss = mean_over_ranks(step_loss, world, device)  # the global batch's loss, the same on every rank
        if not math.isfinite(step_loss):
            raise ConfigError(f"distill.lr: the loss became {step_loss} at step {step + 1}; use a lower learning rate")
        opt.step()
        sched.step()
        history.append(step_loss)
        if progress is not None:
            progress(step + 1, step_loss)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            now, cpu_now = time.perf_counter(), time.process_time()
            seconds, cpu_seconds = seconds + now - t_last, cpu_seconds + cpu_now - cpu_last
            t_last, cpu_last = now, cpu_now
            if world.is_writer:
                save_checkpoint(ckpt_dir, step + 1, student, opt, sched, history, seconds, trajectory, world.size,
                                cpu_seconds)
                log.debug("distill: checkpoint at step %d, loss %.5f", step + 1, step_loss)
    seconds += time.perf_counter() - t_last
    cpu_seconds += time.process_time() - cpu_last

    student.eval()
    result = {
        "complete": True,
        "steps": int(cfg.steps),
        "final_loss": float(history[-1]) if history else float("nan"),
        "loss_curve": [float(x) for x in history],
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "ranks": world.size,
        "trained_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in student.parameters()),
        "student": cfg.student,
        "image_size": student.image_size,
        "input_size": list(input_size(student)),
        "trajectory": json.loads(json.dumps(trajectory, default=str)),
    }
    if world.is_writer:
        save_safetensors_atomic(student.backbone.state_dict(), os.path.join(out_dir, STUDENT_FILE))
        save_safetensors_atomic(student.head.state_dict(), os.path.join(out_dir, HEAD_FILE))
        if cfg.steps > start or resume is None:
            save_checkpoint(ckpt_dir, cfg.steps, student, opt, sched, history, seconds, trajectory, world.size,
                            cpu_seconds)
        write_json_atomic(os.path.join(out_dir, LOG_FILE), result)
        log.info("distill: %d steps in %.1f s on %d rank(s), final loss %.5f", cfg.steps, seconds, world.size,
                 result["final_loss"])
    barrier(world)  # every rank returns once the run's files exist
    return result

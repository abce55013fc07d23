"""A training step of the demo's student when only its last N blocks train (`distill.train_blocks`), against
the whole student, side by side in one run.

    python -m benchmarks.partial_student [--quick]

The demo's student (EfficientNet-Lite0, packaged weights, 64 px, the CPU's batched depthwise gradients),
a step of 16 triplets over 46 images: forward, the AligNet loss, backward and the `AdamDecayToInit` step,
medians of alternating rounds. The whole student's step takes the images; a partial one takes the frozen
front's outputs for them (computed once per image in training, so not in the step), and its one-off cost,
the front's forward per image, is reported beside it. Every variant has the CPU training's swaps
(`use_fast_depthwise_grad`, `use_fast_frozen_norm`); `last_4_torch_batchnorm` is the last 4 blocks with torch's
own BatchNorm backward, the baseline of `models/frozen_norm.py`. Writes results/partial_student.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from alignet_core.runtime.malloc import STAGE_PROCESS, set_malloc_thresholds
from benchmarks._machine import machine_info, write_result
from benchmarks._timing import alternating_rounds, demo_step_inputs, training_step

BLOCKS = (0, 2, 4, 8, 12)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few images and rounds: checks the code, not a result")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    set_malloc_thresholds(STAGE_PROCESS)  # as the pipeline's processes run
    result = _measure(args)
    if not args.no_write:
        write_result("partial_student_quick" if args.quick else "partial_student", result)
    return result


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from alignet_core.distill.objective import AdamDecayToInit
    from alignet_core.models.depthwise import use_fast_depthwise_grad
    from alignet_core.models.frozen_norm import use_fast_frozen_norm
    from alignet_core.models.partial import freeze_front, front_outputs
    from alignet_core.models.student import build_student

    images, repeats = (8, 2) if args.quick else (46, args.repeats)
    cfg, _, x, rows, sims = demo_step_inputs(images)
    cpu = torch.device("cpu")

    variants: dict[str, tuple[torch.nn.Module, torch.Tensor, AdamDecayToInit]] = {}
    front_seconds: dict[str, float] = {}
    trained: dict[str, int] = {}
    for n, torch_norm in ((None, False), *((b, False) for b in BLOCKS), (4, True)):
        student = build_student(cfg, 0).train()
        use_fast_depthwise_grad(student)  # as `distill.train` does on the CPU
        if not torch_norm:
            use_fast_frozen_norm(student)
        name = ("whole" if n is None else f"last_{n}") + ("_torch_batchnorm" if torch_norm else "")
        model, inputs = student, x
        if n is not None:
            model, front = freeze_front(student, n)
            t0 = time.perf_counter()
            inputs = front_outputs(front, x, cpu)
            front_seconds[name] = round((time.perf_counter() - t0) / images, 6)
        trained[name] = sum(p.numel() for p in student.parameters() if p.requires_grad)
        variants[name] = (model, inputs, AdamDecayToInit(student.parameters(), lr=3e-4))

    steps = {name: training_step(model, opt, inputs, rows, sims) for name, (model, inputs, opt) in variants.items()}
    for run in steps.values():  # a first step outside the timing (allocations, oneDNN primitive caches)
        run()
    seconds = alternating_rounds(steps, repeats)
    whole = seconds["whole"]
    return {
        "benchmark": "partial_student",
        "what": "seconds per training step (medians of alternating rounds, torch's default threads) of the demo's "
                "student, whole and with only its last N blocks, head layers and triplet head training",
        "student": cfg.student, "image_size": 64, "images_per_step": images, "triplets_per_step": 16,
        "step_seconds": seconds,
        "speedup_vs_whole": {k: round(whole / v, 2) for k, v in seconds.items()},
        "front_seconds_per_image": front_seconds,
        "trained_parameters": trained,
        "threads": torch.get_num_threads(), "repeats": repeats, "malloc": "runtime.malloc.STAGE_PROCESS",
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()

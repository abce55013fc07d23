"""The student's depthwise weight gradients on the CPU: torch's (oneDNN) against the batched product
(`alignet_core.models.depthwise`), per layer and for a whole training step, side by side in one run.

    python -m benchmarks.depthwise_grad [--quick]

Per depthwise layer of the demo's student (EfficientNet-Lite0 at 64 px, a step's ~46 unique images): the
weight gradient by `torch.ops.aten.convolution_backward` and by `depthwise_weight_grad`, medians of
alternating rounds, with the larger difference between them relative to the gradient's largest entry, and
which one the student uses (`MAX_WASTE`). Then whole steps (forward, backward, `AdamDecayToInit` step) of
two students from the same weights, one with torch's convolutions, one after `use_fast_depthwise_grad`.
Writes results/depthwise_grad.json.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from benchmarks._machine import machine_info, write_result
from benchmarks._timing import alternating_rounds, demo_step_inputs, training_step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few images and rounds: checks the code, not a result")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    result = _measure(args)
    if not args.no_write:
        write_result("depthwise_grad_quick" if args.quick else "depthwise_grad", result)
    return result


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from timm.layers.padding import pad_same

    from alignet_core.distill.objective import AdamDecayToInit
    from alignet_core.models.depthwise import (
        MAX_WASTE,
        DepthwiseConv2d,
        _worth_it,
        depthwise_weight_grad,
        use_fast_depthwise_grad,
    )
    from alignet_core.models.student import build_student

    images, repeats = (8, 3) if args.quick else (46, args.repeats)
    cfg, gen, x, rows, sims = demo_step_inputs(images)

    fast = build_student(cfg, 0).train()
    use_fast_depthwise_grad(fast)
    inputs: list[tuple[str, DepthwiseConv2d, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: inputs.append((name, mod, inp[0].detach())))
             for name, m in fast.named_modules() if isinstance(m, DepthwiseConv2d)]
    with torch.no_grad():
        fast(x)
    for h in hooks:
        h.remove()

    layers = []
    for name, mod, inp in inputs:
        xin = pad_same(inp, list(mod.kernel_size), list(mod.stride)) if mod.same else inp  # as the module pads
        w = mod.weight.detach()
        out = torch.nn.functional.conv2d(xin, w, None, mod.stride, mod.padding, 1, w.shape[0])
        g = torch.randn(out.shape, generator=gen)
        stride, pad = list(mod.stride), list(mod.padding)
        torch_gw = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            g, xin, w, None, stride, pad, [1, 1], False, [0, 0], w.shape[0], [False, True, False])[1]
        batched_gw = lambda: depthwise_weight_grad(xin, g, mod.kernel_size, mod.stride, mod.padding)  # noqa: E731
        ref, mine = torch_gw(), batched_gw()
        seconds = alternating_rounds({"torch": torch_gw, "batched": batched_gw}, repeats)
        layers.append({
            "layer": name, "input": list(xin.shape), "kernel": list(mod.kernel_size), "stride": list(mod.stride),
            "seconds": seconds, "speedup": round(seconds["torch"] / seconds["batched"], 2),
            "used": "batched" if _worth_it(xin, mod.kernel_size, mod.padding) else "torch",
            "max_relative_difference": float((ref - mine).abs().max() / ref.abs().max()),
        })

    plain = build_student(cfg, 0).train()
    students = {"torch": plain, "batched": fast}
    optimizers = {k: AdamDecayToInit(m.parameters(), lr=3e-4) for k, m in students.items()}

    def step(name: str) -> Callable[[], None]:
        return training_step(students[name], optimizers[name], x, rows, sims)

    for name in students:  # a first step outside the timing (allocations, oneDNN primitive caches)
        step(name)()
    steps = alternating_rounds({name: step(name) for name in students}, repeats)
    used = [row for row in layers if row["used"] == "batched"]
    return {
        "benchmark": "depthwise_grad",
        "what": "seconds (medians of alternating rounds, torch's default threads) of depthwise weight gradients and "
                "of whole training steps of the demo's student",
        "student": cfg.student, "image_size": 64, "images_per_step": images, "triplets_per_step": 16,
        "max_waste": MAX_WASTE,
        "layers": layers,
        "layer_seconds_where_used": {"torch": round(sum(r["seconds"]["torch"] for r in used), 6),
                                     "batched": round(sum(r["seconds"]["batched"] for r in used), 6)},
        "step_seconds": steps, "step_speedup": round(steps["torch"] / steps["batched"], 2),
        "threads": torch.get_num_threads(), "repeats": repeats,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()

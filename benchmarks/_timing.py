"""Side-by-side timing for the benchmarks that compare variants in one run."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def alternating_rounds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant over `repeats` rounds, the order reversed every other round (so drift in
    the machine's load falls on every variant alike); rounded to the microsecond."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(v), 6) for name, v in times.items()}


def training_step(model: Any, opt: Any, inputs: Any, rows: Any, sims: Any) -> Callable[[], None]:
    """One student training step as `distill.train` takes it (AligNet loss, backward, optimizer step), as a
    callable for `alternating_rounds`."""
    from alignet_core.distill.objective import alignet_loss, triplet_similarities

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        alignet_loss(triplet_similarities(model(inputs), rows), sims).backward()
        opt.step()
    return run


def demo_step_inputs(images: int) -> tuple[Any, Any, Any, Any, Any]:
    """The demo's student config (Lite0, packaged weights, 64 px, 16 triplets a step) and one step's random
    inputs: (cfg, the generator they were drawn from, images (images, 3, 64, 64), rows (16, 3), sims (16, 3));
    the generator goes on for any further draws."""
    import torch

    from alignet_core.config.distill import DistillConfig

    cfg = DistillConfig(student="tf_efficientnet_lite0", weights="packaged", image_size=64, batch_triplets=16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 64, 64, generator=gen)
    rows = torch.randint(0, images, (16, 3), generator=gen)
    sims = torch.randn(16, 3, generator=gen)
    return cfg, gen, x, rows, sims

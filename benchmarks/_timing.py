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

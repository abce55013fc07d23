"""How a step's batch is cut: ranks × gradient-accumulation micro-batches of equal size (no torch here:
preflight checks it before anything loads)."""

from __future__ import annotations

from alignet_core.errors import ConfigError


def check_micro_batches(batch_triplets: int, grad_accum: int, ranks: int, nodes: int = 1) -> None:
    """`ConfigError` unless ranks·grad_accum micro-batches cut batch_triplets into equal shares; it names
    distill.grad_accum for one rank, distill.devices (and nodes) for several."""
    micro = ranks * grad_accum
    if batch_triplets % micro == 0:
        return
    if ranks == 1:
        raise ConfigError(f"distill.grad_accum: {grad_accum} must divide distill.batch_triplets "
                          f"({batch_triplets}) into equal micro-batches")
    where = f"{ranks} ranks ({nodes} nodes × {ranks // nodes} devices)" if nodes > 1 else f"{ranks} ranks"
    raise ConfigError(
        f"distill.devices: {where} × distill.grad_accum {grad_accum} = {micro} micro-batches must divide "
        f"distill.batch_triplets ({batch_triplets}) into equal shares; use a rank count (or grad_accum) that "
        f"divides it, or a batch_triplets that is a multiple of {micro}"
    )

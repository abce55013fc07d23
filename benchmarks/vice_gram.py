"""VICE's full-batch step through the Gram matrix: today's `_PairDots` against the formulation it replaced,
side by side in one run, on THINGS' size (1,854 objects, 115,313 triplets, 100 dimensions).

    python -m benchmarks.vice_gram [--quick]

Each variant computes the pairs' dot products and the gradient of a weighted sum of them (the work of one
VICE epoch's choice term): `advanced_index_transposed_add` reads the Gram matrix with advanced indexing and
forms G + Gᵀ with a strided add (the code before); `index_select_symmetric_scatter` (`_PairDots` now) reads it
with `index_select` and scatters each pair's gradient at (i, j) and (j, i). Medians of alternating rounds;
the largest difference of the gradients relative to their largest entry. Writes results/vice_gram.json.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from benchmarks._machine import machine_info, write_result
from benchmarks._timing import alternating_rounds


class _PairDotsBefore:
    """The Gram path before: gram[:, flat] and (G + Gᵀ) X."""

    @staticmethod
    def make() -> Any:
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, flat):  # type: ignore[no-untyped-def, override]
                ctx.save_for_backward(x, flat)
                return torch.matmul(x, x.transpose(-1, -2)).flatten(-2)[:, flat]

            @staticmethod
            def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
                x, flat = ctx.saved_tensors
                s, m = x.shape[0], x.shape[1]
                g = x.new_zeros(s, m * m).index_add_(1, flat.reshape(-1), grad.reshape(s, -1)).reshape(s, m, m)
                return torch.matmul(g + g.transpose(-1, -2), x), None

        return F


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the code, not a result")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from alignet_core.human.vice import _pair_index, _PairDots

    m, n, d = (200, 5_000, 16) if args.quick else (1854, 115_313, 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, m, d, generator=gen)
    trip = torch.stack([torch.randperm(m, generator=gen)[:3] for _ in range(n)])
    flat = _pair_index(trip, m)
    w = torch.randn(1, n, 3, generator=gen)
    before = _PairDotsBefore.make()

    def grad_of(fn: Any) -> Callable[[], Any]:
        def run() -> Any:
            x = x0.clone().requires_grad_(True)
            (fn.apply(x, flat) * w).sum().backward()
            return x.grad
        return run

    variants = {"advanced_index_transposed_add": grad_of(before), "index_select_symmetric_scatter": grad_of(_PairDots)}
    a, b = variants["advanced_index_transposed_add"](), variants["index_select_symmetric_scatter"]()
    seconds = alternating_rounds(variants, 2 if args.quick else args.repeats)
    result = {
        "benchmark": "vice_gram",
        "what": "seconds (median of alternating rounds, torch's default threads) of the pairs' dot products and "
                "their gradient through the Gram matrix, one VICE full-batch step's choice term",
        "objects": m, "triplets": n, "dims": d, "seconds": seconds,
        "speedup": round(seconds["advanced_index_transposed_add"] / seconds["index_select_symmetric_scatter"], 2),
        "max_relative_difference": float((a - b).abs().max() / a.abs().max()),
        "threads": torch.get_num_threads(), "machine": machine_info(),
    }
    if not args.no_write:
        write_result("vice_gram_quick" if args.quick else "vice_gram", result)
    return result


if __name__ == "__main__":
    main()

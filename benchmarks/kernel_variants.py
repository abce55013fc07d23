"""Kernel variants measured for the 1M roofline's gaps (issue 33), side by side in one run, one thread.

    python -m benchmarks.kernel_variants [--quick]

- `knn`: `stats.metrics.nearest_neighbours` (partial sort, full sort only for rows tied at the k-th
  similarity) against the stable full argsort it replaced, on 5,000 random rows of width 1,280 and their
  image under a random linear map (the k-NN overlap after each transform fit: two searches); same answer
  checked.
- `shard_dots`: the shards' per-triplet dot products on 250k triplets of a 1M × 768 float16 array (two rows
  of a triplet in one of 500 groups, the third in another, as `cluster_border` draws): the C kernel
  (`sample/pair_dots.c`, what `teacher.pair_dots` runs) in the sampled order and ordered by the first row's
  group (a group's rows stay in cache); numpy's path in the same order of additions (`_numpy_pair_dots`,
  where no compiler is found; same bits checked); the numpy `einsum` passes over gathered blocks that were
  the shards' kernel before the C one (`einsum_dots`); one batched 3 × 3 Gram product per triplet (`torch.bmm`).
Medians of `--repeats` alternating rounds. Writes results/kernel_variants.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks._machine import machine_info, write_result
from benchmarks._timing import alternating_rounds


def _stable_neighbours(e: np.ndarray, k: int) -> np.ndarray:
    u = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
    c = u @ u.T
    np.fill_diagonal(c, -np.inf)
    return np.argsort(-c, axis=1, kind="stable")[:, :k]


def einsum_dots(e: np.ndarray, local: np.ndarray, block: int = 256) -> np.ndarray:
    """The shards' kernel before the C one: blocks of rows gathered by torch, converted to float32 in reused
    buffers, then one numpy `einsum` pass per pair."""
    import torch

    m, p = len(local), e.shape[1]
    out = np.empty((3, m), dtype=np.float32)
    et, flat = torch.from_numpy(e), torch.from_numpy(np.ascontiguousarray(local).reshape(-1))
    gathered, as32 = torch.empty((3 * block, p), dtype=et.dtype), torch.empty((3 * block, p), dtype=torch.float32)
    rows32 = as32.numpy()
    for lo in range(0, m, block):
        n = min(block, m - lo)
        torch.index_select(et, 0, flat[3 * lo : 3 * (lo + n)], out=gathered[: 3 * n])
        as32[: 3 * n].copy_(gathered[: 3 * n])
        x = rows32[: 3 * n].reshape(n, 3, p)
        for j, (u, v) in enumerate(((0, 1), (0, 2), (1, 2))):
            np.einsum("ij,ij->i", x[:, u], x[:, v], out=out[j, lo : lo + n])
    return out.T.copy()


def bmm_dots(e: np.ndarray, local: np.ndarray, block: int = 1024) -> np.ndarray:
    """[s01, s02, s12] per triplet from one (3 × 3) Gram product per triplet (`torch.bmm`), float32."""
    import torch

    m, p = len(local), e.shape[1]
    out = torch.empty((m, 3), dtype=torch.float32)
    et, flat = torch.from_numpy(e), torch.from_numpy(np.ascontiguousarray(local).reshape(-1))
    for lo in range(0, m, block):
        k = min(block, m - lo)
        x = et.index_select(0, flat[3 * lo : 3 * (lo + k)]).float().view(k, 3, p)
        gram = torch.bmm(x, x.transpose(1, 2))
        out[lo : lo + k] = torch.stack([gram[:, 0, 1], gram[:, 0, 2], gram[:, 1, 2]], dim=1)
    return out.numpy()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from alignet_core.hardware import torch_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small arrays: checks the code, not a result")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    with torch_threads(1):  # restored after: a caller in this process keeps its own thread count
        result = _measure(args)
    if not args.no_write:
        write_result("kernel_variants_quick" if args.quick else "kernel_variants", result)
    return result


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant timed on one thread, with the checks that they give the same answers."""
    from alignet_core.sample import native
    from alignet_core.sample.teacher import DOT_BLOCK_TRIPLETS, _numpy_pair_dots, pair_dots
    from alignet_core.stats.metrics import nearest_neighbours

    rng = np.random.default_rng(0)
    r_knn, p_knn = (300, 32) if args.quick else (5000, 1280)
    a = rng.normal(size=(r_knn, p_knn))
    b = a @ rng.normal(size=(p_knn, p_knn))
    same_knn = all(np.array_equal(nearest_neighbours(x, 10), _stable_neighbours(x, 10)) for x in (a, b))
    knn = alternating_rounds({"full_sort": lambda: [_stable_neighbours(x, 10) for x in (a, b)],
                   "partial_sort": lambda: [nearest_neighbours(x, 10) for x in (a, b)]}, args.repeats)

    n, p, m, groups = (20_000, 64, 5_000, 50) if args.quick else (1_000_000, 768, 250_000, 500)
    e = rng.standard_normal((n, p), dtype=np.float32).astype(np.float16)
    group = rng.integers(0, groups, n)
    order = np.argsort(group, kind="stable")
    starts, counts = np.searchsorted(group[order], np.arange(groups)), np.bincount(group, minlength=groups)
    ga = rng.integers(0, groups, m)
    gc = (ga + rng.integers(1, groups, m)) % groups
    pick = lambda g: order[starts[g] + (rng.random(m) * counts[g]).astype(np.int64)]  # noqa: E731
    t = np.stack([pick(ga), pick(ga), pick(gc)], axis=1)
    t = t.astype(np.int64)
    by_group = np.argsort(group[t[:, 0]], kind="stable")
    lib = native.library()
    fallback = _numpy_pair_dots(e, t, DOT_BLOCK_TRIPLETS)
    reference = pair_dots(e, t)
    grouped = np.empty_like(reference)
    grouped[by_group] = pair_dots(e, t[by_group])
    passes, gram = einsum_dots(e, t), bmm_dots(e, t)
    variants = {"numpy_fixed_order": lambda: _numpy_pair_dots(e, t, DOT_BLOCK_TRIPLETS),
                "einsum_passes": lambda: einsum_dots(e, t), "bmm_gram": lambda: bmm_dots(e, t)}
    if lib is not None:
        variants = {"c_kernel": lambda: native.pair_dots(lib, e, t),
                    "c_kernel_group_order": lambda: native.pair_dots(lib, e, t[by_group]), **variants}
    dots = alternating_rounds(variants, args.repeats)
    scale = np.abs(reference).max()
    result = {
        "benchmark": "kernel_variants",
        "what": "seconds (median of alternating rounds, one thread) of kernel variants for the roofline's gaps",
        "knn": {"rows": r_knn, "width": p_knn, "k": 10, "searches": 2, "seconds": knn,
                "speedup": round(knn["full_sort"] / knn["partial_sort"], 2), "same_neighbours": bool(same_knn)},
        "shard_dots": {"rows": n, "width": p, "dtype": "float16", "triplets": m, "groups": groups, "seconds": dots,
                       "c_kernel_built": lib is not None,
                       "speedup_c_vs_einsum": round(dots["einsum_passes"] / dots["c_kernel"], 2) if lib else None,
                       "numpy_fixed_order_equal": bool(np.array_equal(reference, fallback)),
                       "group_order_equal": bool(np.array_equal(reference, grouped)),
                       "einsum_max_relative_difference": float(np.abs(passes - reference).max() / scale),
                       "bmm_max_relative_difference": float(np.abs(gram - reference).max() / scale)},
        "repeats": args.repeats,
        "machine": machine_info(),
    }
    return result


if __name__ == "__main__":
    main()

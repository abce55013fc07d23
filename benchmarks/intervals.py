"""Intervals for accuracies on triplets that share objects: the object-clustered Wilson/Newcombe
intervals of `stats.bootstrap` against the multi-way object bootstrap they replaced.

    python -m benchmarks.intervals            # cost at 37k and 200k triplets, coverage on one setting
    python -m benchmarks.intervals --quick    # smaller: a check that the code runs

Cost: one `accuracy`, one `paired_difference` and one `compare` call (the new method; `compare` groups the
triplets once for its three intervals) on 37,000 test triplets over 382 objects (the size of the audit's
test fold) and on 200,000 triplets over 1,854 objects (THINGS scale);
the old method, one multi-way bootstrap of 2,000 resamples (as `accuracy` drew them), at 37k only: at
200k its (2000, t) int64 weight matrix alone is 3.2 GB (`old_weight_bytes`). Seconds: the median of 3
calls; peak memory: tracemalloc's peak over one more call (numpy and scipy allocations; the figure
that grows with t).

Coverage: one simulated setting (`--objects` 382, `--per-object` 10 appearances per object → 1,273
triplets; per-object effects τ = 0.5 on the log-odds, `simulate`), `--replicates` test sets scored by
both methods (and `--replicates-new` by the new one, for a tighter estimate of its coverage): how often the 95% interval covers the true accuracy (and the true paired change), the
mean width, and the sd of the estimate over the replicates (the width an exact interval would have
is about 2 · 1.96 · sd). Ratios old / new are measured in this one run.
Writes `benchmarks/results/intervals.json` and prints one JSON line.

The simulation (`crossed_design`, `simulate`, `true_accuracy`) is shared with
tests/stats/test_interval_coverage.py: per-object random effects on the log-odds of a correct answer,
before and after (correlated ρ), the same uniform draw deciding both outcomes of a triplet (paired
outcomes that mostly agree, as a model's before/after answers do).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from scipy.special import expit

from alignet_core.stats import bootstrap
from benchmarks._machine import machine_info, write_result


def crossed_design(m: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """(t, 3) int64: t triplets of three distinct objects drawn uniformly from m (object ids 0..m-1)."""
    tri = rng.integers(0, m, (t, 3))
    while True:
        bad = (tri[:, 0] == tri[:, 1]) | (tri[:, 0] == tri[:, 2]) | (tri[:, 1] == tri[:, 2])
        if not bad.any():
            return tri
        tri[bad] = rng.integers(0, m, (int(bad.sum()), 3))


def true_accuracy(mu: float, tau: float) -> float:
    """E[σ(μ + a_i + a_j + a_k)] with a ~ N(0, τ²) iid: the population accuracy, by 120-node
    Gauss–Hermite quadrature (error far below 1e-10 for these smooth integrands)."""
    x, w = np.polynomial.hermite_e.hermegauss(120)
    return float((w * expit(mu + np.sqrt(3.0) * tau * x)).sum() / w.sum())


def simulate(triplets: np.ndarray, replicates: int, rng: np.random.Generator, mu_before: float = 0.3,
             mu_after: float = 0.5, tau: float = 0.5, rho: float = 0.8,
             shared_objects: bool = True) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Outcomes of `replicates` test sets on the objects of `triplets` (t, 3): (before, after) (t, R) bool
    and the true accuracies (before, after).

    Each replicate draws new object effects a_i ~ N(0, τ²) (before) and c_i = ρ a_i + √(1−ρ²) b_i (after,
    b independent of a): the objects of a test set are a random draw from a population. A triplet is right
    before when u < σ(μ_b + a_i + a_j + a_k), after when u < σ(μ_a + c_i + c_j + c_k), with one u ~ U(0, 1)
    per triplet. `shared_objects=False` gives every triplet its own three objects (independent triplets, the
    case the 'triplets' unit is for)."""
    t = len(triplets)
    if shared_objects:
        m = int(triplets.max()) + 1
        a = rng.normal(0.0, tau, (m, replicates))
        c = rho * a + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, tau, (m, replicates))
        sa, sc = a[triplets].sum(1), c[triplets].sum(1)  # (t, R)
    else:
        a = rng.normal(0.0, np.sqrt(3.0) * tau, (t, replicates))
        sa, sc = a, rho * a + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, np.sqrt(3.0) * tau, (t, replicates))
    u = rng.random((t, replicates))
    before, after = u < expit(mu_before + sa), u < expit(mu_after + sc)
    return before, after, true_accuracy(mu_before, tau), true_accuracy(mu_after, tau)


def old_object_bootstrap(values: np.ndarray, triplets: np.ndarray, seed: int, n_boot: int = 2000,
                         level: float = 0.95) -> tuple[float, float]:
    """The replaced method, as `stats.bootstrap` had it: resample the objects with replacement, weight each
    triplet by the product of its three objects' multiplicities, percentile interval of the weighted
    means. values: (t,) float (0/1 outcomes or −1/0/+1 changes). Kept here only to measure it."""
    rng = np.random.default_rng(seed)
    objects, local = np.unique(triplets, return_inverse=True)
    local = local.reshape(triplets.shape)
    counts = rng.multinomial(len(objects), np.full(len(objects), 1.0 / len(objects)), size=n_boot)  # (B, m)
    w = counts[:, local[:, 0]] * counts[:, local[:, 1]] * counts[:, local[:, 2]]  # (B, t)
    total = w.sum(1)
    keep = total > 0
    samples = (w[keep] @ values.astype(np.float64)) / total[keep]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _cost(fn: Callable[[], object], repeats: int = 3) -> dict:
    """Median seconds of `repeats` calls, then tracemalloc's peak (MiB) over one more."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"s": round(float(np.median(times)), 4), "peak_mib": round(peak / 2**20, 1)}


def cost_case(m: int, t: int, old: bool, seed: int = 0) -> dict:
    """Time and peak memory of the new method (accuracy + paired_difference on objects) on t triplets over
    m objects, and of one old multi-way bootstrap when `old`."""
    rng = np.random.default_rng(seed)
    tri = crossed_design(m, t, rng)
    before, after, _, _ = simulate(tri, 1, rng)
    before, after = before[:, 0], after[:, 0]
    case = {"objects": m, "triplets": t,
            "new_accuracy": _cost(lambda: bootstrap.accuracy(after, 0, tri)),
            "new_paired_difference": _cost(lambda: bootstrap.paired_difference(before, after, 0, tri)),
            "new_compare": _cost(lambda: bootstrap.compare(before, after, 0, tri)),
            "old_weight_bytes": 2000 * t * 8}
    if old:
        case["old_one_bootstrap"] = _cost(lambda: old_object_bootstrap(after.astype(float), tri, 0), repeats=1)
    return case


def coverage_case(m: int, per_object: int, replicates: int, replicates_new: int, seed: int = 0,
                  n_boot: int = 2000) -> dict:
    """Coverage and mean width of the new and the old object intervals on `replicates` simulated test sets
    (one design of m objects, each in about `per_object` triplets; `simulate` defaults), and of the new ones
    alone on `replicates_new` (≥ `replicates`; the first `replicates` are the shared ones)."""
    rng = np.random.default_rng(seed)
    tri = crossed_design(m, per_object * m // 3, rng)
    before_all, after_all, p_before, p_after = simulate(tri, max(replicates, replicates_new), rng)
    overlap = bootstrap.ObjectOverlap(tri)
    _, lo_all, hi_all = bootstrap.accuracy_interval(before_all, overlap)
    _, dlo_all, dhi_all = bootstrap.difference_interval(before_all, after_all, overlap)
    before, after = before_all[:, :replicates], after_all[:, :replicates]
    lo, hi, dlo, dhi = lo_all[:replicates], hi_all[:replicates], dlo_all[:replicates], dhi_all[:replicates]
    old_acc = np.array([old_object_bootstrap(before[:, r].astype(float), tri, r, n_boot) for r in range(replicates)])
    delta = after.astype(float) - before
    old_chg = np.array([old_object_bootstrap(delta[:, r], tri, r, n_boot) for r in range(replicates)])
    true_change = p_after - p_before

    def summary(lo: np.ndarray, hi: np.ndarray, truth: float) -> dict:
        cover = float(np.mean((lo <= truth) & (truth <= hi)))
        return {"coverage": round(cover, 4), "coverage_sd": round(float(np.sqrt(cover * (1 - cover) / len(lo))), 4),
                "mean_width_points": round(100 * float(np.mean(hi - lo)), 3)}

    delta_all = after_all.astype(float) - before_all
    acc = {"new": summary(lo, hi, p_before), "old": summary(old_acc[:, 0], old_acc[:, 1], p_before),
           "new_all_replicates": summary(lo_all, hi_all, p_before),
           "exact_width_points": round(100 * 2 * 1.96 * float(before_all.mean(0).std()), 3)}
    chg = {"new": summary(dlo, dhi, true_change), "old": summary(old_chg[:, 0], old_chg[:, 1], true_change),
           "new_all_replicates": summary(dlo_all, dhi_all, true_change),
           "exact_width_points": round(100 * 2 * 1.96 * float(delta_all.mean(0).std()), 3)}
    for part in (acc, chg):
        part["width_ratio_old_to_new"] = round(part["old"]["mean_width_points"] / part["new"]["mean_width_points"], 3)
    return {"objects": m, "triplets": len(tri), "replicates": replicates, "replicates_new": len(lo_all),
            "n_boot_old": n_boot,
            "true_accuracy": round(p_before, 5), "true_change": round(true_change, 5),
            "accuracy": acc, "change": chg}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few replicates (a run check)")
    ap.add_argument("--objects", type=int, default=382)
    ap.add_argument("--per-object", type=int, default=10)
    ap.add_argument("--replicates", type=int, default=400, help="test sets scored by both methods")
    ap.add_argument("--replicates-new", type=int, default=4000, help="test sets scored by the new method")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        sizes, objects, replicates, replicates_new = [(382, 3_700, True), (1_854, 20_000, False)], 60, 50, 200
    else:
        sizes, objects = [(382, 37_000, True), (1_854, 200_000, False)], args.objects
        replicates, replicates_new = args.replicates, args.replicates_new
    t0 = time.perf_counter()
    cost = [cost_case(m, t, old, args.seed) for m, t, old in sizes]
    coverage = coverage_case(objects, args.per_object, replicates, replicates_new, args.seed)
    result = {"benchmark": "intervals", "quick": args.quick, "cost": cost, "coverage": coverage,
              "wall_s": round(time.perf_counter() - t0, 1), "machine": machine_info()}
    if not args.quick:
        write_result("intervals", result)
    else:
        import json
        print(json.dumps(result))


if __name__ == "__main__":
    main()

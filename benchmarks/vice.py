"""VICE on the real THINGS trials: fit time and memory of the CPU step issue 31 budgets (≤ 2 min, < 1 GiB).

    python -m benchmarks.vice [--triplets PATH] [--threads 1] [--holdout 0.1] [--setting fast|reference]

Fits `fit_vice` on every trial of the triplet file (default: /work/shared/data/things-human/
triplets.txt, 115,313 human odd-one-out choices over the 1,854 THINGS objects; the data are not
shipped with the project) with the documented fast setting (`ViceConfig.fast()`: full-batch steps
through the object Gram matrix, lr 0.1, burn-in 200 epochs, stop when the pruned dimensionality
has been stable for 200 epochs, checked every 10) on `--threads` torch threads. Records the wall
and CPU seconds of the fit, the epochs run, whether the stability rule stopped it, the kept
dimensions, and memory: the process's resident set before the fit and its peak (VmHWM) after,
which includes torch itself. With `--holdout f` a second fit on a seeded (1 − f) share of the
trials scores the held-out f: posterior-predictive accuracy and NLL of the human choices (chance
1/3 and ln 3; the THINGS noise ceiling is about 0.67 and VICE's published 42-d embedding scores
0.645 on the full test split).
Writes `benchmarks/results/vice.json` (with the machine's load average: on a shared machine the
wall time is an upper bound, the CPU time / threads a lower one) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks._machine import machine_info, write_result

THINGS_TRIPLETS = Path("/work/shared/data/things-human/triplets.txt")


def _status_mib(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB, None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def fit_once(triplets: np.ndarray, n_objects: int, cfg, threads: int, val: np.ndarray | None = None) -> dict:
    """One timed `fit_vice` on CPU: seconds (wall, CPU), epochs, stop reason, dims, memory."""
    import torch

    from alignet_core.hardware import torch_threads
    from alignet_core.human.vice import fit_vice

    rss_before = _status_mib("VmRSS")
    with torch_threads(threads):
        c0, t0 = time.process_time(), time.perf_counter()
        model = fit_vice(triplets, n_objects, cfg, seed=0, device=torch.device("cpu"), val=val)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "n_triplets": len(triplets), "n_objects": int(n_objects),
        "n_objects_with_triplets": model.info["n_objects_with_triplets"],
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "epochs_run": model.info["epochs_run"],
        "converged": model.info["converged"], "dims": model.dim,
        "rss_before_fit_mib": rss_before, "peak_rss_mib": _status_mib("VmHWM"),
        "dims_at_checks": [(h["epoch"], h["dims"]) for h in model.info["history"]][::5],
    }
    if val is not None:
        p = model.predict_probabilities(val, seed=0)
        out["heldout_acc"] = round(float(np.mean((p[:, 0] > p[:, 1]) & (p[:, 0] > p[:, 2]))), 4)
        out["heldout_nll"] = round(float(-np.log(np.maximum(p[:, 0], 1e-12)).mean()), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triplets", type=Path, default=THINGS_TRIPLETS)
    ap.add_argument("--n-objects", type=int, default=1854)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (vice.threads); 1 is fastest on a loaded machine")
    ap.add_argument("--holdout", type=float, default=0.0, help="also fit on 1 - f of the trials, score the rest")
    ap.add_argument("--setting", choices=["fast", "reference"], default="fast")
    args = ap.parse_args(argv)
    from alignet_core.config.human import ViceConfig

    triplets = np.loadtxt(args.triplets, dtype=np.int64)
    cfg = ViceConfig.fast() if args.setting == "fast" else ViceConfig()
    result = {"benchmark": "vice", "triplets": str(args.triplets), "setting": args.setting,
              "vice": cfg.model_dump(), "threads": args.threads, "machine_before": machine_info()}
    result["all_trials"] = fit_once(triplets, args.n_objects, cfg, args.threads)
    if args.holdout > 0:
        perm = np.random.default_rng(0).permutation(len(triplets))
        n_val = round(args.holdout * len(triplets))
        result["holdout"] = {"fraction": args.holdout,
                             **fit_once(triplets[perm[n_val:]], args.n_objects, cfg, args.threads,
                                        val=triplets[perm[:n_val]])}
    result["machine"] = machine_info()
    write_result("vice", result)


if __name__ == "__main__":
    main()

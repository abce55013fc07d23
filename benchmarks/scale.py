"""The pipeline at a million images on this machine: `alignet run` (Prefect, as users run it) from existing
embeddings to a verified, published 10M-triplet dataset, at three sizes.

    python -m benchmarks.scale                       # n = 250k, 500k, 1M → benchmarks/results/scale.json
    python -m benchmarks.scale --sizes 250000        # one size
    python -m benchmarks.scale --quick               # n = 20k, 200k triplets → results/scale_quick.json
    python -m benchmarks.scale --memory-limit-gib 8  # every command under a kernel-enforced 8 GiB limit

Per size n (data from `benchmarks.scale_data`: n × 1,280 float16 rows in 500 generating groups, written as
a memory-mapped `.npy` with `ids.txt` and `labels.txt` = the groups, plus THINGS-format human-like
triplets with choice probabilities over 1,854 objects; made before the clock starts):
1. `alignet run -c <config> --root <fresh root>` in a subprocess: import (`source.kind: embeddings`) →
   transform fit and apply → k-means k = 500 → sampling `cluster_border` and `between_class`
   (5M train + 10k valid each: 10,020,000 triplets) → publish (official `.npz`, Zarr copy, manifest,
   checksums, retention) → the run's report. Distillation and evaluation are off (`distill.enabled`,
   `evaluate.enabled`: false): distillation needs pixels, which imported embeddings do not have.
2. the same command again: the fully cached rerun (every stage reused from its manifest).
3. `alignet datasets verify` (every published file's sha256 against the manifest).

Recorded per stage: wall seconds (the stage's manifest `metrics.seconds`; for sampling the shards are
timed from the group files to the last shard file and publication from there to the manifest; the
report from the sample manifest to `report.md`), bytes on disk (the stage's folder; the published
version for publish), and peak memory as the kernel charges it: the benchmark joins a memory cgroup
(`benchmarks/_cgroup.py`) and samples its usage every `SAMPLE_S` (page cache included: every file a
stage writes or reads is charged until the kernel reclaims it, which it does only under pressure) and
the resident anonymous memory of its processes (`rss` of the cgroup's memory.stat: the memory no
reclaim can free); a stage's peak is the highest sample inside its window, the run's `peak_cgroup`
the kernel's own maximum. CPU seconds of each command (its process tree, from `getrusage`) stand beside
the wall seconds: on a shared machine they change less with other work. `flow_overhead_s` is the first
run's wall time outside the stages (interpreter and library imports, preflight, Prefect's temporary
server, Dask's cluster starting and stopping). Cluster recovery: the cluster stage's adjusted Rand index against the
source's labels, which are the generating groups. Slopes: a least-squares line of each stage's seconds
(and peak) in n over the sizes, and the log-log exponent (1 = linear). Machine info and the load average
before and after each size: the machine is shared, so other work slows the run and is recorded, not
hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from alignet_core.runtime.runner import ROOT_TOKEN
from benchmarks._cgroup import MemoryCgroup
from benchmarks._machine import RESULTS, machine_info, write_result
from benchmarks.scale_data import ScaleSpec, group_labels, write_embeddings, write_human

SIZES = (250_000, 500_000, 1_000_000)
QUICK_SIZE = 20_000
TRIPLETS_PER_STRATEGY = 5_000_000  # × 2 strategies = 10M train triplets
QUICK_TRIPLETS_PER_STRATEGY = 100_000
N_VALID = 10_000  # per strategy, as the official valid files
SHARD_SIZE = 250_000  # 40 shards for 10M: a Prefect task per shard costs ~0.3 s of scheduling
QUICK_SHARD_SIZE = 25_000
K = 500
STRATEGIES = ["cluster_border", "between_class"]
SAMPLE_S = 0.5
DATASET = "scale"
TARGETS = {"wall_s_1m": 900.0, "peak_gib_1m": 8.0, "cached_fraction": 0.05}
GIB = 2**30


# ----------------------------------------------------------------------------- configuration
def pipeline_config(data: dict[str, Path], human: dict[str, Path], n_train: int, shard_size: int) -> dict[str, Any]:
    """The run's config: imported embeddings, the generated human triplets, k = 500, both strategies."""
    return {
        "dataset_name": DATASET,
        "seed": 0,
        "keep_versions": 2,
        "source": {"kind": "embeddings", "path": str(data["embeddings"]), "format": "auto",
                   "ids": str(data["ids"]), "labels": str(data["labels"])},
        "human": {"triplets": str(human["triplets"]), "probabilities": str(human["probabilities"]),
                  "objects": str(human["objects"]), "folds": 5},
        "transform": {"enabled": True, "targets": "soft", "epochs": 8},
        "cluster": {"k": K},
        "sample": {"strategies": STRATEGIES, "n_train": n_train, "n_valid": N_VALID, "shard_size": shard_size,
                   "n_workers": 2},
        "distill": {"enabled": False},
        "evaluate": {"enabled": False},
    }


# ----------------------------------------------------------------------------- memory sampling
class MemorySampler:
    """Samples (time, cgroup usage, cgroup rss) of a memory cgroup — or, without one, the summed RSS of a
    process tree — every `SAMPLE_S` in a thread."""

    def __init__(self, group: MemoryCgroup | None, root_pid: int | None = None) -> None:
        self.group, self.root_pid = group, root_pid
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> tuple[int, int]:
        if self.group is not None:
            v1 = (self.group.path / "memory.usage_in_bytes").exists()
            usage = int((self.group.path / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
            stat = dict(line.split() for line in (self.group.path / "memory.stat").read_text().splitlines())
            return usage, int(stat.get("total_rss", stat.get("rss", stat.get("anon", 0))))
        import psutil

        total = 0
        try:
            procs = [psutil.Process(self.root_pid or os.getpid())]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0, 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total, total

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                usage, rss = self._read()
                self.samples.append((time.time(), usage, rss))
            except (OSError, ValueError):
                pass
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> dict[str, float | None]:
        """Highest sampled usage and rss (GiB) in [start, end] (the nearest sample when none falls inside)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside and self.samples:
            inside = [min(self.samples, key=lambda s: abs(s[0] - (start + end) / 2))]
        if not inside:
            return {"peak_charged_gib": None, "peak_rss_gib": None}
        return {"peak_charged_gib": round(max(s[1] for s in inside) / GIB, 3),
                "peak_rss_gib": round(max(s[2] for s in inside) / GIB, 3)}


# ----------------------------------------------------------------------------- what a run left on disk
def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under `path` (blocks, as `du`)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "manifest.json").read_text())


def _one_dir(root: Path, stage: str) -> Path:
    found = [p for p in (root / "stages" / stage).glob("*") if (p / "manifest.json").exists()]
    if len(found) != 1:
        raise RuntimeError(f"expected one finished {stage} stage under {root}, found {len(found)}")
    return found[0]


def stage_windows(root: Path) -> dict[str, dict[str, Any]]:
    """Each stage's (start, end) wall clock, seconds and folder, from its manifest and files."""
    out: dict[str, dict[str, Any]] = {}
    for stage in ("embed", "transform", "cluster"):
        d = _one_dir(root, stage)
        end = (d / "manifest.json").stat().st_mtime
        seconds = float(_manifest(d)["metrics"].get("seconds") or 0.0)
        out[stage] = {"start": end - seconds, "end": end, "seconds": seconds, "dir": d}
    d = _one_dir(root, "sample")
    groups = min(p.stat().st_mtime for p in d.glob("groups_*.npy"))
    last_shard = max(p.stat().st_mtime for p in (d / "shards").glob("*.npz"))
    end = (d / "manifest.json").stat().st_mtime
    version = Path(_manifest(d)["metrics"]["publish_url"].replace(ROOT_TOKEN, str(root), 1))  # "<root>/datasets/..."
    out["sample"] = {"start": groups, "end": last_shard, "seconds": last_shard - groups, "dir": d / "shards"}
    out["publish"] = {"start": last_shard, "end": end, "seconds": end - last_shard, "dir": version}
    reports = list((root / "reports" / DATASET).glob("*/report.md"))
    if reports:
        r_end = max(p.stat().st_mtime for p in reports)
        out["report"] = {"start": end, "end": r_end, "seconds": r_end - end, "dir": reports[0].parent}
    return out


# ----------------------------------------------------------------------------- one size
def _alignet(args: list[str], log: Path) -> tuple[float, int, float]:
    """Run the `alignet` CLI of this interpreter's environment from this checkout; (wall seconds, return
    code, CPU seconds of the command and every process it waited for: Prefect's server, Dask's workers)."""
    cmd = [sys.executable, "-m", "flows.cli", *args]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parent.parent).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t0, rc, cpu


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_size(n: int, work: Path, quick: bool, keep: bool, limit_gib: float | None = None) -> dict[str, Any]:
    """Generate the data of size n (untimed), then the first run, the cached rerun and the verification;
    with `limit_gib`, all three under a kernel-enforced memory limit of the benchmark's cgroup."""
    spec = ScaleSpec(n=n)
    data_dir, root = work / f"data-{n}", work / f"root-{n}"
    t0 = time.perf_counter()
    data = write_embeddings(spec, data_dir)
    human = write_human(spec, data_dir, group_labels(spec))
    generate_s = time.perf_counter() - t0
    n_train = QUICK_TRIPLETS_PER_STRATEGY if quick else TRIPLETS_PER_STRATEGY
    cfg = pipeline_config(data, human, n_train, QUICK_SHARD_SIZE if quick else SHARD_SIZE)
    cfg_path = work / f"config-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(root, ignore_errors=True)
    log = work / f"run-{n}.log"
    log.unlink(missing_ok=True)
    load_start = _load()
    group = MemoryCgroup.join("scale-bench")
    if group is not None and limit_gib:
        group.set_limit(int(limit_gib * GIB))
    elif limit_gib:
        raise RuntimeError(f"--memory-limit-gib {limit_gib:g}: no writable memory cgroup here to enforce it")
    events: dict[str, int] = {}
    try:
        with MemorySampler(group) as mem:
            first_s, rc, first_cpu = _alignet(["run", "-c", str(cfg_path), "--root", str(root)], log)
            if rc != 0:
                raise RuntimeError(f"alignet run failed for n = {n} (exit {rc}); see {log}")
            peak_first = group.peak_bytes() if group else None
            events = group.limit_events() if group and limit_gib else {}
            windows = stage_windows(root)  # before the rerun, which rewrites the report
            stage_bytes = {name: disk_bytes(w["dir"]) for name, w in windows.items()}
            root_bytes = disk_bytes(root)
            if group:
                group.reset_peak()
            cached_s, rc, cached_cpu = _alignet(["run", "-c", str(cfg_path), "--root", str(root)], log)
            if rc != 0:
                raise RuntimeError(f"cached rerun failed for n = {n} (exit {rc}); see {log}")
            verify_t = time.time()
            verify_s, verify_rc, _ = _alignet(["datasets", "verify", DATASET, "--root", str(root)], log)
    finally:
        if group:
            group.leave()
    load_end = _load()
    stages: dict[str, Any] = {}
    for name, w in windows.items():
        stages[name] = {"seconds": round(w["seconds"], 2), "bytes_on_disk": stage_bytes[name],
                        **mem.peak(w["start"], w["end"])}
    stages["verify"] = {"seconds": round(verify_s, 2), "bytes_on_disk": 0, **mem.peak(verify_t, verify_t + verify_s),
                        "exit_code": verify_rc}
    cluster = _manifest(windows["cluster"]["dir"])["metrics"]
    fits = _manifest(windows["transform"]["dir"])["metrics"]
    sample = _manifest(_one_dir(root, "sample"))["metrics"]
    result = {
        "n": n,
        "dim": spec.dim,
        "generate_s": round(generate_s, 2),
        "input_bytes": disk_bytes(data["embeddings"]),
        "first_run_s": round(first_s, 2),
        "first_run_cpu_s": round(first_cpu, 1),
        "cached_rerun_s": round(cached_s, 2),
        "cached_rerun_cpu_s": round(cached_cpu, 1),
        "cached_fraction": round(cached_s / first_s, 4),
        "first_run_plus_verify_s": round(first_s + verify_s, 2),
        "stages_sum_s": round(sum(s["seconds"] for s in stages.values()), 2),
        "peak_cgroup_gib": round(peak_first / GIB, 3) if peak_first is not None else None,
        "memory_limit_gib": limit_gib,
        "limit_hits_first_run": events.get("limit_hits"),
        "oom_kills_first_run": events.get("oom_kills"),
        "peak_rss_gib": max((s["peak_rss_gib"] or 0.0) for s in stages.values()),
        "root_bytes_on_disk": root_bytes,
        "flow_overhead_s": round(first_s - sum(w["seconds"] for w in windows.values()), 2),
        "cluster_recovery_ari": cluster.get("ari"),
        # the epochs each transform fit ran (early stopping ends a fold's sooner): the roofline's fit work
        "transform_epochs": {"folds": [f["epochs_run"] for f in fits.get("folds") or []],
                             "refit": (fits.get("refit") or {}).get("epochs")},
        "cluster_recovery_nmi": cluster.get("nmi"),
        "n_triplets_published": sample["n_triplets"],
        "verified": verify_rc == 0,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "stages": stages,
    }
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- slopes
def fit_slopes(ns: list[int], values: list[float]) -> dict[str, float | None]:
    """Least-squares line values ≈ a + b·n (b per million rows) and the log-log exponent (1 = linear)
    over the sizes; None for fewer than two sizes."""
    if len(ns) < 2:
        return {"per_million": None, "intercept": None, "loglog_exponent": None}
    x, y = np.asarray(ns, dtype=np.float64), np.asarray(values, dtype=np.float64)
    b, a = np.polyfit(x, y, 1)
    pos = y > 0
    exp = float(np.polyfit(np.log(x[pos]), np.log(y[pos]), 1)[0]) if pos.sum() >= 2 else None
    return {"per_million": round(float(b) * 1e6, 4), "intercept": round(float(a), 4),
            "loglog_exponent": None if exp is None else round(exp, 3)}


def slopes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ns = [r["n"] for r in runs]
    out: dict[str, Any] = {}
    for stage in runs[0]["stages"]:
        out[stage] = {"seconds": fit_slopes(ns, [r["stages"][stage]["seconds"] for r in runs])}
        peaks = [r["stages"][stage]["peak_rss_gib"] for r in runs]
        if all(p is not None for p in peaks):
            out[stage]["peak_rss_gib"] = fit_slopes(ns, peaks)
    out["first_run"] = {"seconds": fit_slopes(ns, [r["first_run_s"] for r in runs]),
                        # CPU seconds change less with other work on a shared machine than wall seconds
                        "cpu_seconds": fit_slopes(ns, [r["first_run_cpu_s"] for r in runs])}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated numbers of rows")
    p.add_argument("--quick", action="store_true", help=f"n = {QUICK_SIZE:,} and {2 * QUICK_TRIPLETS_PER_STRATEGY:,} "
                   "train triplets: checks the benchmark end to end in a few minutes")
    p.add_argument("--work", default="/tmp/scale-bench", help="folder for the generated data and the roots")
    p.add_argument("--keep", action="store_true", help="keep each size's artifact root (GBs) after measuring")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="run every command under this kernel-enforced memory limit (the cgroup's; e.g. 8, the target)")
    p.add_argument("--out", help="result file (default benchmarks/results/scale.json, scale_quick.json with --quick)")
    args = p.parse_args(argv)
    sizes = [QUICK_SIZE] if args.quick else [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    runs = []
    out = Path(args.out) if args.out else RESULTS / ("scale_quick.json" if args.quick else "scale.json")
    result: dict[str, Any] = {}
    for n in sizes:
        runs.append(run_size(n, work, args.quick, args.keep, args.memory_limit_gib))
        big = max(runs, key=lambda r: r["n"])
        result = {
            "benchmark": "scale",
            "what": "alignet run (Prefect, subprocess) from imported embeddings: import → transform fit+apply → "
                    f"k-means k={K} → {len(STRATEGIES)} strategies × "
                    f"{QUICK_TRIPLETS_PER_STRATEGY if args.quick else TRIPLETS_PER_STRATEGY:,} train + {N_VALID:,} "
                    "valid triplets → publish → report; then the same command (cached) and `alignet datasets verify`",
            "skipped": "distill and evaluate (distill.enabled / evaluate.enabled false): imported embeddings carry "
                       "no pixels to distill from",
            "data": "benchmarks.scale_data: n × 1280 float16 rows, 500 generating groups in 20 superordinate "
                    "categories (labels.txt = the groups), 100k human-like THINGS-format triplets over 1854 objects",
            "memory": "peak_charged: cgroup usage, page cache included (sampled every 0.5 s); peak_rss: resident "
                      "anonymous memory of the cgroup's processes (sampled); peak_cgroup_gib: the kernel's maximum "
                      "of the first run; memory_limit_gib: the cgroup's kernel-enforced limit during all three commands "
                      "(null: none), limit_hits_first_run: how often usage reached it (the kernel then reclaimed page "
                      "cache), oom_kills_first_run: processes it killed",
            "machine": machine,
            "targets": TARGETS,
            "runs": runs,
            "slopes": slopes(runs) if len(runs) > 1 else None,
        }
        if big["n"] >= 1_000_000:
            result["target_check_1m"] = {
                "first_run_plus_verify_s": big["first_run_plus_verify_s"],
                "wall_ok": big["first_run_plus_verify_s"] <= TARGETS["wall_s_1m"],
                "peak_rss_gib": big["peak_rss_gib"],
                "peak_cgroup_gib": big["peak_cgroup_gib"],
                "peak_rss_ok": big["peak_rss_gib"] <= TARGETS["peak_gib_1m"],
                "memory_limit_gib": big["memory_limit_gib"],
                "ran_within_limit": (big["memory_limit_gib"] is not None
                                     and big["memory_limit_gib"] <= TARGETS["peak_gib_1m"]
                                     and big["oom_kills_first_run"] == 0),
                "cached_fraction": big["cached_fraction"],
                "cached_ok": big["cached_fraction"] <= TARGETS["cached_fraction"],
            }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every size: a partial result survives
    if result:
        write_result(out.stem, result, out.parent)


if __name__ == "__main__":
    main()

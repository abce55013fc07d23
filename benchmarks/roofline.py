"""A roofline table of the 1M scale run: each stage's time beside the time this machine's measured rates
allow for the work the stage must do.

    python -m benchmarks.roofline                  # rates at full size → benchmarks/results/roofline.json
    python -m benchmarks.roofline --times FILE     # stage times from another scale result
    python -m benchmarks.roofline --quick          # small arrays, a few seconds (checks the code; not a result)

Machine rates (each the median of `repeats` timed runs, after a warm-up; torch and FAISS use every core
they are given, as the pipeline's stages do):
- `gemm_gflops`: float32 `torch.matmul` of the stages' shapes (the transform's apply, n-chunk × p @ p × p;
  a k-means distance block, n-chunk × p @ p × k); 2·m·k·n FLOPs per product. The roof is the fastest shape.
  `faiss_gflops`: FAISS `IndexFlatL2.search` of a chunk against k centroids (2·m·k·p), for comparison.
- `memory_read_gbps`: `torch.sum` over a float32 array far larger than the caches (bytes / seconds).
- `random_rows`: `torch.index_select` of random rows of an (n, p) matrix, float16 (the imported rows) and
  float32 (the transformed store's rows, which sampling gathers): rows/s and GB/s.
- `sha256_gbps`: `hashlib.sha256` of an in-memory buffer (one thread: files are hashed one at a time).
- `disk`: write a file in 64 MiB blocks and fsync it (write GB/s, fsync included), drop it from the page
  cache (`posix_fadvise(DONTNEED)`, checked with `fincore`: `cache_dropped` says whether the read came from
  the disk), read it back (read GB/s), and read it again from the page cache (`cached_read_gbps`).

Stage work (from the scale benchmark's parameters: `benchmarks.scale.pipeline_config`, `ScaleSpec`, the
config models' defaults; n and p from the times file). p = dimensions, n = rows.
Each stage is split into phases that run one after another; a phase's bound is
max(cpu, memory, disk) with cpu = FLOPs / GEMM rate + hashed bytes / sha256 rate, memory = sequential
bytes / memory read rate + random-row bytes / random-row rate, disk = bytes written / disk write rate +
bytes read from disk / disk read rate. The stage's bound is the sum of its phases' bounds;
ratio = measured seconds / bound (1 = at the roof).
- embed (import): read the float16 source once (n·p·2, page cache: the source was written just before)
  and write the float32 store (n·p·4, disk). The source's sha256 and finiteness pass run in preflight
  (flow overhead) and are cached; the stage only stats the file.
- transform: fit + apply. Which fits (`--transform-fits`, `transform_fits`): `single`, the one fit of the
  code that recorded the 1M times (before the k-fold rotation of 2026-12-06: f − 2 of the f = human.folds
  folds of objects train, one stops early, one tests), or `rotation`, today's code (one fit per fold on
  the other f − 1 folds, then the refit on every triplet); the JSON also projects the other model's
  transform row (`transform_other_model`). A fit on a share q of the m objects fits the t·q³ triplets
  whose objects all lie there, less its early-stopping split (val_fraction, at most val_max_triplets)
  (the refit: all t). Per step of B triplets: the u distinct objects of the batch,
  u = m_q·(1 − (1 − 1/m_q)^{3B}) (expected, m_q = q·m), go through W forward and W's gradient backward
  (4·u·p²); the local term (α > 0) on L = local_batch pool rows: forward + gradient 4·L·p², the teacher's
  and the transformed cosine matrices and the latter's gradient 8·L²·p. Per epoch the evaluation
  transforms the m objects (2·m·p²). After each fit the k-NN overlap on R = 5,000 pool rows: two
  neighbour searches 2·2·R²·p and one apply 2·R·p². Adam reads and writes W's state every step:
  7·4·p² bytes (memory). Epochs per fit: those it ran when the times file records them (`transform_epochs`,
  scale results since 2026-12-06), else `transform.epochs` (8), the configured maximum (early stopping
  may end a fit sooner: the bound is then too long). Apply = 2·n·p² FLOPs, the store
  read (n·p·4, page cache) and the transformed float32 store written (n·p·4, disk).
- cluster: gather the training sample (s = min(n, k·max_points_per_centroid) random rows, s·p·4);
  greedy k-means++ init: per centre a (trials × s) distance block, trials = 2 + ⌊ln k⌋, so
  (k−1)·2·trials·s·p FLOPs and (k−1)·s·p·4 bytes (the sample is read once per centre); Lloyd:
  niter·nredo·2·s·k·p FLOPs; assignment: 2·n·k·p FLOPs and the store read once (n·p·4).
- sample: T = strategies × (n_train + n_valid) triplets, each gathering 3 random rows (3·p·4 bytes) and
  3 dot products (6·p FLOPs); the shards written (their bytes on disk, from the times file).
- publish: the shards read (page cache), the `.npz` files (ZIP_STORED: per triplet 3·(8 + 4 + 4·c) bytes,
  c = characters of an image id) and the arrays (3·12 bytes per triplet) hashed, the published version
  written (its bytes on disk, from the times file).
- report: no bulk data (figures and markdown of the stages' metrics): its bound is its bytes written and
  it gets no ratio (it would measure a fixed cost, not a rate).
- verify: every published file read (page cache) and hashed (sha256).

The stage times come from a recorded scale result (`--times`, default the 1M run of today's code, `scale_1m_rotation.json`), not from this
run: the scale run takes minutes and 12 GB of disk. Both load averages are recorded: a shared machine
(load above its cores) makes the measured rates pessimistic, so the bounds longer and the ratios smaller.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# FAISS's OpenMP threads spin while waiting by default (see benchmarks/kmeans.py); set before it loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from alignet_core.config.cluster import ClusterConfig
from alignet_core.config.embed import EmbedConfig
from alignet_core.config.human import HumanConfig
from alignet_core.config.sample import SampleConfig
from alignet_core.config.transform import TransformConfig
from alignet_core.transform.rotation import KNN_ROWS, POOL_ROWS
from benchmarks._machine import RESULTS, machine_info, write_result
from benchmarks.scale import SHARD_SIZE, STRATEGIES, TRIPLETS_PER_STRATEGY, K, pipeline_config
from benchmarks.scale_data import ScaleSpec, image_id

DEFAULT_TIMES = RESULTS / "scale_1m_c_kernel.json"
GB = 1e9
MIB = 2**20

#: which transform fits the default times file's code made (`transform_fits`): `scale_1m_rotation.json`
#: (2026-12-06) the k-fold rotation; `scale_1m_quiet.json` and scale.json (2026-11-30) the single fit before it
#: (pass `--times ... --transform-fits single`)
RECORDED_FIT_MODEL = "rotation"


# ----------------------------------------------------------------------------- machine rates
def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rates(shapes: dict[str, tuple[int, int, int]], repeats: int) -> dict[str, float]:
    """float32 `torch.matmul` GFLOP/s per named (m, k, n) shape: (m, k) @ (k, n), 2·m·k·n FLOPs."""
    import torch

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, (m, k, n) in shapes.items():
        a, b = torch.rand((m, k), generator=gen), torch.rand((k, n), generator=gen)
        c = torch.empty((m, n))
        s = _median_seconds(lambda: torch.matmul(a, b, out=c), repeats)
        out[name] = round(2 * m * k * n / s / GB, 2)
    return out


def faiss_rate(m: int, p: int, k: int, repeats: int) -> float:
    """FAISS `IndexFlatL2.search(x, 1)` GFLOP/s of m float32 rows against k centroids (2·m·k·p FLOPs)."""
    import faiss

    rng = np.random.default_rng(0)
    index = faiss.IndexFlatL2(p)
    index.add(rng.random((k, p), dtype=np.float32))
    x = rng.random((m, p), dtype=np.float32)
    s = _median_seconds(lambda: index.search(x, 1), repeats)
    return round(2 * m * k * p / s / GB, 2)


def memory_read_rate(nbytes: int, repeats: int) -> float:
    """Sequential read GB/s: `torch.sum` of a float32 array of `nbytes` (every thread torch uses)."""
    import torch

    x = torch.ones(nbytes // 4)
    s = _median_seconds(lambda: x.sum(), repeats)
    return round(x.numel() * 4 / s / GB, 2)


def random_rows_rate(n: int, p: int, dtype: str, rows: int, repeats: int) -> dict[str, float]:
    """Random-row gather: `torch.index_select` of `rows` uniformly drawn rows of an (n, p) `dtype` matrix;
    rows/s and GB/s of rows delivered."""
    import torch

    x = torch.ones((n, p), dtype=getattr(torch, dtype))
    idx = torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(0))
    out = torch.empty((rows, p), dtype=x.dtype)
    s = _median_seconds(lambda: torch.index_select(x, 0, idx, out=out), repeats)
    row_bytes = p * x.element_size()
    return {"n": n, "p": p, "dtype": dtype, "row_bytes": row_bytes, "matrix_gb": round(n * row_bytes / GB, 3),
            "rows_per_s": round(rows / s), "gbps": round(rows * row_bytes / s / GB, 2)}


def sha256_rate(nbytes: int, repeats: int) -> float:
    """`hashlib.sha256` GB/s over an in-memory buffer of `nbytes` (one thread)."""
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    s = _median_seconds(lambda: hashlib.sha256(buf).digest(), repeats)
    return round(nbytes / s / GB, 3)


def _resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache (`fincore`), None when fincore is missing or fails."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True)
    try:
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (IndexError, ValueError):
        return None


def disk_rates(folder: Path, nbytes: int, repeats: int) -> dict[str, Any]:
    """Write `nbytes` in 64 MiB blocks + fsync (write GB/s), drop the file from the page cache
    (posix_fadvise DONTNEED), read it back (read GB/s), then read it again hot (cached read GB/s);
    medians over `repeats` files. `cache_dropped`: whether fincore saw the file leave the cache (None:
    fincore unavailable, so the read may have come from memory)."""
    block = min(64 * MIB, nbytes)
    buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
    writes, reads, hot, dropped = [], [], [], []
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(repeats):
        fd_path = Path(tempfile.mkstemp(dir=folder, prefix="roofline-", suffix=".bin")[1])
        try:
            t0 = time.perf_counter()
            with open(fd_path, "wb", buffering=0) as f:
                for _ in range(nbytes // block):
                    f.write(buf)
                os.fsync(f.fileno())
            writes.append(nbytes / (time.perf_counter() - t0) / GB)
            with open(fd_path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            resident = _resident_bytes(fd_path)
            dropped.append(None if resident is None else resident < nbytes // 100)
            for into in (reads, hot):
                t0 = time.perf_counter()
                with open(fd_path, "rb", buffering=0) as f:
                    while f.read(block):
                        pass
                into.append(nbytes / (time.perf_counter() - t0) / GB)
        finally:
            fd_path.unlink(missing_ok=True)
    known = [d for d in dropped if d is not None]
    return {"folder": str(folder), "file_gib": round(nbytes / 2**30, 3), "write_gbps": round(statistics.median(writes), 3),
            "read_gbps": round(statistics.median(reads), 3), "cached_read_gbps": round(statistics.median(hot), 3),
            "cache_dropped": (all(known) if known else None),
            "note": ("read after posix_fadvise(DONTNEED); fincore confirmed the file left the page cache"
                     if known and all(known) else
                     "the page cache could not be dropped (or not checked): read_gbps may be a memory rate")}


@dataclass(frozen=True)
class Sizes:
    """Array sizes of the rate measurements (full: larger than every cache; quick: a few seconds)."""

    gemm_rows: int = 65_536
    memory_bytes: int = 2 * 2**30
    random_n: int = 1_000_000
    random_rows: int = 200_000
    hash_bytes: int = 512 * MIB
    disk_bytes: int = 2**30
    repeats: int = 5
    disk_repeats: int = 3


QUICK = Sizes(gemm_rows=1024, memory_bytes=64 * MIB, random_n=20_000, random_rows=20_000, hash_bytes=16 * MIB,
              disk_bytes=32 * MIB, repeats=3, disk_repeats=1)


def measure_rates(p: int, k: int, sizes: Sizes, disk_folder: Path) -> dict[str, Any]:
    """Every machine rate at the stages' width p and k (see the module doc)."""
    gemm = gemm_rates({f"{sizes.gemm_rows}x{p} @ {p}x{p} (transform apply)": (sizes.gemm_rows, p, p),
                       f"{sizes.gemm_rows}x{p} @ {p}x{k} (k-means distances)": (sizes.gemm_rows, p, k),
                       f"{sizes.gemm_rows}x768 @ 768x500": (sizes.gemm_rows, 768, 500)}, sizes.repeats)
    half = sizes.random_n // 2
    return {
        "gemm_gflops_by_shape": gemm,
        "gemm_gflops": max(gemm.values()),
        "faiss_gflops": faiss_rate(sizes.gemm_rows, p, k, sizes.repeats),
        "memory_read_gbps": memory_read_rate(sizes.memory_bytes, sizes.repeats),
        "random_rows": {"float16": random_rows_rate(sizes.random_n, p, "float16", sizes.random_rows, sizes.repeats),
                        "float32": random_rows_rate(half, p, "float32", sizes.random_rows, sizes.repeats)},
        "sha256_gbps": sha256_rate(sizes.hash_bytes, sizes.repeats),
        "disk": disk_rates(disk_folder, sizes.disk_bytes, sizes.disk_repeats),
    }


# ----------------------------------------------------------------------------- stage work
@dataclass
class Phase:
    """The work of one phase of a stage: FLOPs, bytes hashed, bytes read sequentially and as random rows
    from memory (page cache included), bytes written to and read from disk."""

    name: str
    flops: float = 0.0
    hash_bytes: float = 0.0
    seq_bytes: float = 0.0
    random_bytes: float = 0.0
    disk_write_bytes: float = 0.0
    disk_read_bytes: float = 0.0
    formula: str = ""


def expected_distinct(m: int, draws: int) -> float:
    """Expected number of distinct items among `draws` uniform draws from m."""
    return m * (1.0 - (1.0 - 1.0 / m) ** draws)


def transform_fits(n_objects: int, n_triplets: int, folds: int, tcfg: TransformConfig, model: str,
                   epochs_run: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The fits the transform stage makes: `single` (the code that recorded the 1M times, before the k-fold
    rotation of 2026-12-06: one fit on the f − 2 training folds of objects, a validation fold and a test fold
    held out) or `rotation` (today's code: one fit per fold on the other f − 1 folds, then the refit on every
    triplet). Each: objects it trains on, triplets it fits (training triplets less the early-stopping split),
    epochs: those each fit ran when the times file records them (`epochs_run`: {"folds": [...], "refit": e},
    rotation only), else the configured maximum, `transform.epochs`."""
    def split(keep: float) -> float:
        train = n_triplets * keep**3  # triplets with all three objects among the kept folds
        return train - min(round(train * tcfg.val_fraction), tcfg.val_max_triplets)

    if model == "single":
        keep = (folds - 2) / folds
        return [{"fit": "training folds", "objects": n_objects * keep, "triplets": split(keep), "epochs": tcfg.epochs}]
    if model != "rotation":
        raise ValueError(f"transform fit model: expected 'single' or 'rotation', got {model!r}")
    keep = (folds - 1) / folds
    ran = epochs_run if epochs_run and len(epochs_run.get("folds") or []) == folds and epochs_run.get("refit") else None
    fits = [{"fit": f"fold {f}", "objects": n_objects * keep, "triplets": split(keep),
             "epochs": int(ran["folds"][f]) if ran else tcfg.epochs} for f in range(folds)]
    return fits + [{"fit": "refit", "objects": n_objects, "triplets": n_triplets,
                    "epochs": int(ran["refit"]) if ran else tcfg.epochs}]


def transform_fit_phase(p: int, n_objects: int, fits: list[dict[str, Any]], tcfg: TransformConfig,
                        pool_rows: int = POOL_ROWS, knn_rows: int = KNN_ROWS) -> tuple[Phase, dict[str, Any]]:
    """The transform fit's FLOPs and optimizer bytes (module doc) over `fits` (`transform_fits`), and the
    numbers that went into them (each fit gains steps, distinct objects per step and FLOPs)."""
    local = min(tcfg.local_batch, pool_rows) if tcfg.alpha > 0 else 0
    knn = min(knn_rows, pool_rows)
    flops = opt_bytes = 0.0
    out = []
    for fit in fits:
        m = fit["objects"]
        u = expected_distinct(int(round(m)), 3 * tcfg.batch_size)
        steps = math.ceil(fit["triplets"] / tcfg.batch_size) * fit["epochs"]
        step_flops = 4 * u * p * p + (4 * local * p * p + 8 * local * local * p if local else 0)
        fit_flops = (steps * step_flops + fit["epochs"] * 2 * n_objects * p * p
                     + 2 * 2 * knn * knn * p + 2 * knn * p * p)
        out.append({**fit, "distinct_objects_per_step": round(u, 1), "steps": steps, "flops_per_step": step_flops,
                    "flops": fit_flops})
        flops += fit_flops
        opt_bytes += steps * 7 * 4 * p * p
    phase = Phase("fit", flops=flops, seq_bytes=opt_bytes,
                  formula="Σ_fits steps·(4·u·p² + 4·L·p² + 8·L²·p) + epochs·2·m·p² + 4·R²·p + 2·R·p²; Adam 7·4·p² B/step")
    return phase, {"fits": out, "batch_size": tcfg.batch_size, "local_batch": local, "knn_rows": knn,
                   "alpha": tcfg.alpha, "epochs": "each fit's epochs as the times file records them (transform_epochs), "
                   "else transform.epochs, the configured maximum (early stopping may stop a fit sooner: then the "
                   "bound is too long and the ratio too small)"}


def stage_work(n: int, p: int, stage_bytes: dict[str, int], fit_model: str = RECORDED_FIT_MODEL,
               epochs_run: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each stage's phases and parameters for the scale run of n rows of width p; `stage_bytes`: each stage's
    bytes on disk from the times file (shards, the published version); `fit_model`: `transform_fits`."""
    dummy = {key: Path(key) for key in ("embeddings", "ids", "labels", "triplets", "probabilities", "objects")}
    cfg = pipeline_config(dummy, dummy, TRIPLETS_PER_STRATEGY, SHARD_SIZE)
    spec = ScaleSpec(n=n, dim=p)
    tcfg = TransformConfig(**cfg["transform"])
    ccfg = ClusterConfig(**cfg["cluster"])
    scfg = SampleConfig(**cfg["sample"])
    folds = int(cfg["human"].get("folds", HumanConfig.model_fields["folds"].default))
    store_b = np.dtype(EmbedConfig().store_dtype).itemsize
    src_b = 2  # the scale data's rows are float16 (`scale_data.write_embeddings`)
    out: dict[str, dict[str, Any]] = {}

    out["embed"] = {"params": {"n": n, "p": p, "source_bytes_per_value": src_b, "store_bytes_per_value": store_b},
                    "phases": [Phase("copy", seq_bytes=n * p * src_b, disk_write_bytes=n * p * store_b,
                                     formula="read n·p·2 (page cache), write n·p·4 (disk)")]}

    fits = transform_fits(spec.n_objects, spec.n_triplets, folds, tcfg, fit_model, epochs_run)
    fit, fit_params = transform_fit_phase(p, spec.n_objects, fits, tcfg)
    out["transform"] = {"params": {"n": n, "p": p, "folds": folds, "n_objects": spec.n_objects,
                                   "n_triplets": spec.n_triplets, "fit_model": fit_model, **fit_params},
                        "phases": [fit, Phase("apply", flops=2 * n * p * p, seq_bytes=n * p * store_b,
                                              disk_write_bytes=n * p * 4, formula="2·n·p² FLOPs; read n·p·4, write n·p·4")]}

    s = min(n, ccfg.k * ccfg.max_points_per_centroid)
    trials = 2 + int(np.log(ccfg.k))
    out["cluster"] = {"params": {"n": n, "p": p, "k": ccfg.k, "train_rows": s, "init_trials": trials,
                                 "niter": ccfg.niter, "nredo": ccfg.nredo},
                      "phases": [Phase("gather sample", random_bytes=s * p * 4, formula="s·p·4 random rows"),
                                 Phase("k-means++ init", flops=(ccfg.k - 1) * 2 * trials * s * p,
                                       seq_bytes=(ccfg.k - 1) * s * p * 4,
                                       formula="(k−1)·2·trials·s·p FLOPs; (k−1)·s·p·4 B"),
                                 Phase("lloyd", flops=ccfg.niter * ccfg.nredo * 2 * s * ccfg.k * p,
                                       formula="niter·nredo·2·s·k·p"),
                                 Phase("assign", flops=2 * n * ccfg.k * p, seq_bytes=n * p * 4,
                                       formula="2·n·k·p FLOPs; read n·p·4")]}

    t = len(STRATEGIES) * (scfg.n_train + scfg.n_valid)
    out["sample"] = {"params": {"triplets": t, "strategies": len(STRATEGIES), "n_train": scfg.n_train,
                                "n_valid": scfg.n_valid, "p": p, "shards_bytes": stage_bytes.get("sample", 0)},
                     "phases": [Phase("gather + dots", flops=t * 6 * p, random_bytes=t * 3 * p * 4,
                                      formula="T·3 random rows of p·4 B; T·6·p FLOPs"),
                                Phase("write shards", disk_write_bytes=stage_bytes.get("sample", 0),
                                      formula="shards' bytes on disk")]}

    id_chars = len(image_id(0))
    npz = t * 3 * (8 + 4 + 4 * id_chars)
    arrays = t * 3 * 12
    published = stage_bytes.get("publish", 0)
    out["publish"] = {"params": {"triplets": t, "image_id_chars": id_chars, "npz_bytes": npz, "arrays_bytes": arrays,
                                 "published_bytes": published},
                      "phases": [Phase("read shards", seq_bytes=stage_bytes.get("sample", 0), formula="shards' bytes"),
                                 Phase("write", disk_write_bytes=published, formula="published version's bytes on disk"),
                                 Phase("hash", hash_bytes=npz + arrays, seq_bytes=npz + arrays,
                                       formula="sha256 of T·3·(12 + 4·c) npz bytes + T·3·12 array bytes")]}
    out["report"] = {"params": {"bytes_written": stage_bytes.get("report", 0)}, "fixed_cost": True,
                     "phases": [Phase("write", disk_write_bytes=stage_bytes.get("report", 0),
                                      formula="report's bytes on disk (no bulk data: a fixed cost)")]}
    out["verify"] = {"params": {"published_bytes": published},
                     "phases": [Phase("read + hash", hash_bytes=published, seq_bytes=published,
                                      formula="sha256 of every published file (page cache)")]}
    return out


# ----------------------------------------------------------------------------- bounds
def phase_bound(phase: Phase, rates: dict[str, Any]) -> dict[str, Any]:
    """A phase's limits (cpu, memory, disk seconds) and bound = their maximum (module doc)."""
    rnd = rates["random_rows"]["float32"]["gbps"] * GB
    limits = {
        "cpu_s": phase.flops / (rates["gemm_gflops"] * GB) + phase.hash_bytes / (rates["sha256_gbps"] * GB),
        "memory_s": phase.seq_bytes / (rates["memory_read_gbps"] * GB) + phase.random_bytes / rnd,
        "disk_s": phase.disk_write_bytes / (rates["disk"]["write_gbps"] * GB)
        + phase.disk_read_bytes / (rates["disk"]["read_gbps"] * GB),
    }
    bound = max(limits.values())
    return {**asdict(phase), **{k: round(v, 4) for k, v in limits.items()}, "bound_s": round(bound, 4),
            "limited_by": max(limits, key=limits.get).removesuffix("_s")}


def stage_rows(times: dict[str, Any], rates: dict[str, Any], fit_model: str = RECORDED_FIT_MODEL) -> list[dict[str, Any]]:
    """One row per stage of the times file's run: work, bound (sum of its phases' bounds), time, ratio.
    A stage the work model does not know gets a row with no bound."""
    stages = times["stages"]
    work = stage_work(times["n"], times["dim"], {k: int(v.get("bytes_on_disk") or 0) for k, v in stages.items()},
                      fit_model, times.get("transform_epochs"))
    rows = []
    for name, rec in stages.items():
        seconds = float(rec["seconds"])
        if name not in work:
            rows.append({"stage": name, "seconds": seconds, "bound_s": None, "ratio": None, "phases": []})
            continue
        phases = [phase_bound(ph, rates) for ph in work[name]["phases"]]
        bound = round(sum(ph["bound_s"] for ph in phases), 4)
        fixed = bool(work[name].get("fixed_cost"))  # no bulk data: a ratio would measure nothing but the fixed cost
        top = max(phases, key=lambda ph: ph["bound_s"])
        flops = sum(ph["flops"] for ph in phases)
        moved = sum(ph["seq_bytes"] + ph["random_bytes"] + ph["disk_write_bytes"] + ph["disk_read_bytes"]
                    for ph in phases)
        rows.append({"stage": name, "seconds": seconds, "flops": flops, "bytes_moved": moved,
                     # what the recorded run achieved on average over the stage (FLOPs and bytes moved / time)
                     "achieved_gflops": round(flops / seconds / GB, 2) if seconds > 0 else None,
                     "achieved_gbps": round(moved / seconds / GB, 3) if seconds > 0 else None,
                     "bound_s": bound, "ratio": round(seconds / bound, 3) if bound > 0 and not fixed else None,
                     "limited_by": "fixed cost (no bulk data)" if fixed else f"{top['name']}: {top['limited_by']}",
                     "work": work[name]["params"],
                     "phases": phases})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: stage, TFLOP, GB moved, bound (s), time (s), ratio, the largest phase's limit."""
    head = f"{'stage':<10} {'TFLOP':>8} {'GB moved':>9} {'bound s':>9} {'time s':>8} {'ratio':>7}  limited by"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["bound_s"] is None:
            lines.append(f"{r['stage']:<10} {'':>8} {'':>9} {'':>9} {r['seconds']:>8.1f} {'':>7}  (no work model)")
            continue
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.1f}"
        lines.append(f"{r['stage']:<10} {r['flops'] / 1e12:>8.2f} {r['bytes_moved'] / GB:>9.1f} {r['bound_s']:>9.2f} "
                     f"{r['seconds']:>8.1f} {ratio:>7}  {r['limited_by']}")
    return "\n".join(lines)


def load_times(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The largest run of a scale result file and where it came from (file, n, load averages)."""
    data = json.loads(path.read_text())
    run = max(data["runs"], key=lambda r: r["n"])
    source = {"file": str(path.relative_to(RESULTS.parent.parent)) if path.is_relative_to(RESULTS.parent.parent)
              else str(path), "n": run["n"], "dim": run["dim"], "load_avg_start": run.get("load_avg_start"),
              "load_avg_end": run.get("load_avg_end"), "machine_load_avg": data.get("machine", {}).get("load_avg_1_5_15"),
              "first_run_s": run.get("first_run_s"), "flow_overhead_s": run.get("flow_overhead_s")}
    return run, source


def run(times_path: Path, sizes: Sizes, disk_folder: Path, fit_model: str = RECORDED_FIT_MODEL) -> dict[str, Any]:
    """Measure the rates, model every stage of the times file's run (the transform's fits by `fit_model`),
    and return the result, with the other fit model's transform row as a projection (no time)."""
    times, source = load_times(times_path)
    load_before = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    rates = measure_rates(times["dim"], K, sizes, disk_folder)
    measure_s = time.perf_counter() - t0
    load_after = [round(v, 2) for v in os.getloadavg()]
    rows = stage_rows(times, rates, fit_model)
    other = "rotation" if fit_model == "single" else "single"
    projected = next((r for r in stage_rows(times, rates, other) if r["stage"] == "transform"), None)
    if projected is not None:
        projected.update({"seconds": None, "ratio": None,
                          "note": f"the transform's work and bound under the '{other}' fits; no time measured"})
    cores = machine_info()["cores"] or 1
    return {
        "benchmark": "roofline",
        "what": "each stage of the scale run beside the time this machine's measured rates allow for its work "
                "(bound = Σ phases max(cpu, memory, disk); ratio = time / bound)",
        "stage_times": {**source, "transform_fit_model": fit_model,
                        "note": "times recorded by benchmarks.scale (a separate run: it takes minutes), not measured "
                                "here"},
        "rates_measured_under_load": {"load_avg_before": load_before, "load_avg_after": load_after, "cores": cores,
                                      "pessimistic": max(load_before[0], load_after[0]) > 1.0,
                                      "seconds": round(measure_s, 1)},
        "sizes": asdict(sizes),
        "rates": rates,
        "stages": rows,
        "transform_other_model": projected,
        "beat_the_bound": {"stages": [r["stage"] for r in rows if r["ratio"] is not None and r["ratio"] < 1],
                           "note": "a ratio below 1 means the recorded run went faster than the rates measured here "
                                   "allow: those rates are below the quiet machine's (the load above), so every bound "
                                   "is too long by at least that factor"},
        "table": format_table(rows).splitlines(),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--times", type=Path, default=DEFAULT_TIMES,
                    help="a scale result (default: the 1M run of the k-fold rotation's code, scale_1m_rotation.json)")
    ap.add_argument("--transform-fits", choices=("single", "rotation"), default=RECORDED_FIT_MODEL,
                    help="the transform fits the times' code made: rotation (the default file, and any scale result "
                         "recorded since 2026-12-06) or single (before the k-fold rotation: scale_1m_quiet.json, "
                         "scale.json)")
    ap.add_argument("--quick", action="store_true", help="small arrays, a few seconds: checks the code, not a result")
    ap.add_argument("--disk-dir", type=Path, default=Path("/tmp"), help="folder for the disk test's file (the scale "
                    "run's --work lives under /tmp)")
    ap.add_argument("--out", type=Path, help="result file (default results/roofline.json; roofline_quick.json with --quick)")
    args = ap.parse_args(argv)
    result = run(args.times, QUICK if args.quick else Sizes(), args.disk_dir, args.transform_fits)
    out = args.out or RESULTS / ("roofline_quick.json" if args.quick else "roofline.json")
    write_result(out.stem, result, out.parent)
    src, load = result["stage_times"], result["rates_measured_under_load"]
    print(f"\nstage times: {src['file']} (n = {src['n']:,}, recorded at load {src['load_avg_start']}); rates measured "
          f"now at load {load['load_avg_before']} → {load['load_avg_after']} on {load['cores']} cores"
          + (" (pessimistic: the machine is shared)" if load["pessimistic"] else ""))
    print(format_table(result["stages"]))


if __name__ == "__main__":
    main()

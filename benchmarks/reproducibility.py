"""Reproducibility across CPU kernels and thread counts: how much of the published dataset changes.

    python -m benchmarks.reproducibility                  # every variant below, ~3 minutes on 2 cores
    python -m benchmarks.reproducibility --variants baseline_again,one_thread

The dataset stages (embed → transform → cluster → sample → publish) run as the flow calls them, minus
Prefect, on a small demo config (`small_config`: 120 emoji, 1,500 triplets of two strategies), once per
variant, each in a fresh process under a fresh root. A variant changes only the environment variables
that choose CPU kernels and thread counts (`VARIANTS`); the baseline runs with none of them set (this
machine's defaults). Shards run one after another in the variant's process on one thread, as the
pipeline's single-threaded Dask workers run them.

Each variant is compared with the baseline stage by stage (`compare_runs`):
- embeddings and the transformed store: bit-identical?, max |Δ| relative to the largest |value|;
- clusters: rows whose cluster changed, and the adjusted Rand index (1 = the same partition);
- each published .npz: bytes identical?; rows keyed by their unordered image triple: triplets in only
  one of the two files, and of the triplets in both, those whose odd one out changed (label flips) and
  the max |Δ similarity| over the rest.
`baseline_again` (the baseline's environment, another process) checks the promise of
docs/reproducibility.md that the same inputs on the same machine and thread count give identical
bytes. Writes `benchmarks/results/reproducibility.json` (machine info included) and prints one JSON line.
"""

from __future__ import annotations

from alignet_core.context import RunContext
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._machine import RESULTS, machine_info, write_result

#: environment variables that choose kernels or thread counts: unset in every variant but where it sets them
KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE",
         "NPY_DISABLE_CPU_FEATURES", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")

#: variant → (environment it sets, what it changes)
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "baseline": ({}, "this machine's defaults: every core, the widest kernels torch and the BLAS libraries detect"),
    "baseline_again": ({}, "the baseline's environment in another process: the bit-identity promise"),
    "one_thread": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
                   "one thread in torch, MKL and OpenBLAS: reductions split differently"),
    "aten_default": ({"ATEN_CPU_CAPABILITY": "default"},
                     "torch's non-AVX kernels (ATen dispatch): other SIMD widths, other summation orders"),
    "openblas_sandybridge": ({"OPENBLAS_CORETYPE": "Sandybridge"},
                             "numpy's, scipy's and FAISS's OpenBLAS on its AVX (no FMA) kernels"),
    "onednn_sse41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"},
                     "oneDNN (torch's convolutions) on its SSE4.1 kernels, as on a CPU without AVX"),
}
DEFAULT_VARIANTS = ("baseline_again", "one_thread", "aten_default", "openblas_sandybridge", "onednn_sse41")


def small_config(root: str) -> Any:
    """The demo pipeline cut down (the flows tests' `tiny` sizes): 120 images, k = 5, 1,200 + 300 triplets of
    each strategy in 400-triplet shards; no distillation, no evaluation (they do not change the dataset)."""
    from alignet_core.config import parse_config, with_overrides

    return with_overrides(parse_config({}), {
        "root": root, "source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4, "cluster.k": 5,
        "sample.n_train": 1200, "sample.n_valid": 300, "sample.shard_size": 400, "distill.enabled": False,
        "evaluate.enabled": False,
    })


# ----------------------------------------------------------------------------- one variant (a child process)
def run_pipeline(root: str) -> dict[str, Any]:
    """The dataset stages under `root`; where each output is, the kernels and threads they ran with, seconds."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from alignet_core.cluster.stage import run_cluster
    from alignet_core.embed.stage import run_embed
    from alignet_core.sample.stage import plan_sample, publish_sample, run_sample_shard
    from alignet_core.transform.stage import run_transform

    cfg = small_config(root)
    ctx = RunContext.of(cfg)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    emb = run_embed(ctx)
    seconds["embed"] = time.perf_counter() - t0
    tfm = run_transform(ctx, emb)
    seconds["transform"] = time.perf_counter() - t0 - sum(seconds.values())
    clu = run_cluster(ctx, tfm)
    seconds["cluster"] = time.perf_counter() - t0 - sum(seconds.values())
    sp = plan_sample(ctx, tfm, clu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # as the Dask workers run the shards: one thread each
        for spec in sp.specs:
            run_sample_shard(sp, spec)
    torch.set_num_threads(threads)
    ds = publish_sample(ctx, sp)
    seconds["sample"] = time.perf_counter() - t0 - sum(seconds.values())
    return {
        "embeddings": emb.artifact, "transformed": tfm.artifact, "clusters": clu.artifact, "dataset": ds.artifact,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": threads,
        "blas": sorted({f"{i['internal_api']} {i.get('architecture')} ×{i['num_threads']}" for i in threadpool_info()
                        if i["user_api"] == "blas"}),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def run_variant(name: str, root: Path) -> dict[str, Any]:
    """`run_pipeline` in a fresh process with the variant's environment (and no other kernel or thread knob)."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(VARIANTS[name][0])
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "benchmarks.reproducibility", "--run-one", str(root)], env=env,
                         capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"variant {name}: exit {out.returncode}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- comparisons
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Bit-identical?, and max |a − b| / max |a| (float64)."""
    same = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if a.shape != b.shape:
        return {"identical": False, "shapes": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    scale = float(np.abs(a.astype(np.float64)).max()) or 1.0
    return {"identical": bool(same), "max_abs_diff": float(d.max()) if d.size else 0.0,
            "max_rel_diff": float(d.max() / scale) if d.size else 0.0,
            "elements_differing": int((d > 0).sum())}


def compare_splits(a: Path, b: Path) -> dict[str, Any]:
    """Two published .npz files of one name: bytes, and what differs row by row (triplets keyed by their
    unordered image triple; in a published file each triple occurs once)."""
    out: dict[str, Any] = {"identical_bytes": _sha256(a) == _sha256(b)}
    za, zb = np.load(a), np.load(b)
    ia, ib, sa, sb = za["indices"], zb["indices"], za["similarities"], zb["similarities"]
    out["arrays_identical"] = bool(np.array_equal(ia, ib) and sa.tobytes() == sb.tobytes())
    key_a = {tuple(sorted(r)): i for i, r in enumerate(ia.tolist())}
    key_b = {tuple(sorted(r)): i for i, r in enumerate(ib.tolist())}
    common = key_a.keys() & key_b.keys()
    flips = [k for k in common if ia[key_a[k], 2] != ib[key_b[k], 2]]
    same_odd = [(key_a[k], key_b[k]) for k in common if ia[key_a[k], 2] == ib[key_b[k], 2]]
    ra, rb = (np.array(x, dtype=np.int64) for x in zip(*same_odd)) if same_odd else (np.zeros(0, np.int64),) * 2
    # the odd one out agrees; its pair may be listed as (i, j) or (j, i): compare s01 and the sorted (s02, s12)
    s_a, s_b = sa[ra], sb[rb]
    swap_a = ia[ra, 0] > ia[ra, 1]
    swap_b = ib[rb, 0] > ib[rb, 1]
    s_a[swap_a] = s_a[swap_a][:, [0, 2, 1]]
    s_b[swap_b] = s_b[swap_b][:, [0, 2, 1]]
    d = np.abs(s_a.astype(np.float64) - s_b.astype(np.float64))
    out.update({
        "rows": [len(ia), len(ib)],
        "rows_same_position": int((ia == ib).all(1).sum()) if len(ia) == len(ib) else None,
        "triplets_only_in_baseline": len(key_a.keys() - common),
        "triplets_only_in_variant": len(key_b.keys() - common),
        "label_flips": len(flips),
        "changed_fraction": round((len(key_a.keys() - common) + len(flips)) / max(1, len(ia)), 5),
        "similarities_max_abs_diff": float(d.max()) if d.size else 0.0,
        "similarities_max_rel_diff": float((d / np.maximum(np.abs(s_a), 1e-30)).max()) if d.size else 0.0,
    })
    return out


def compare_runs(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Stage by stage, `other` against `base` (see the module doc)."""
    from sklearn.metrics import adjusted_rand_score

    from alignet_core.io.embedding_store import open_embeddings

    out: dict[str, Any] = {}
    for stage in ("embeddings", "transformed"):
        ea, eb = (open_embeddings(r[stage])["embeddings"][:] for r in (base, other))
        out[stage] = compare_arrays(ea, eb)
    ca, cb = np.load(base["clusters"]), np.load(other["clusters"])
    out["clusters"] = {"identical": bool(np.array_equal(ca, cb)), "rows": len(ca),
                       "rows_changed": int((ca != cb).sum()), "adjusted_rand_index": float(adjusted_rand_score(ca, cb))}
    files = sorted(p.name for p in Path(base["dataset"]).glob("*.npz"))
    assert files == sorted(p.name for p in Path(other["dataset"]).glob("*.npz")), "the published files differ in name"
    out["dataset"] = {name: compare_splits(Path(base["dataset"]) / name, Path(other["dataset"]) / name) for name in files}
    ds = out["dataset"].values()
    rows = sum(f["rows"][0] for f in ds)
    out["dataset_summary"] = {
        "files_identical": sum(f["identical_bytes"] for f in ds), "files": len(files), "rows": rows,
        "triplets_only_in_baseline": sum(f["triplets_only_in_baseline"] for f in ds),
        "label_flips": sum(f["label_flips"] for f in ds),
        "changed_fraction": round(sum(f["triplets_only_in_baseline"] + f["label_flips"] for f in ds) / max(1, rows), 5),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, compared with the baseline; of {sorted(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    parser.add_argument("--root", type=Path, default=None, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--run-one", metavar="ROOT", help=argparse.SUPPRESS)  # a variant's child process
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_pipeline(args.run_one)))
        return {}
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS or v == "baseline"]
    if unknown:
        parser.error(f"--variants: {unknown} unknown; expected some of {sorted(set(VARIANTS) - {'baseline'})}")
    with tempfile.TemporaryDirectory(prefix="alignet-repro-", dir=args.root) as tmp:
        t0 = time.perf_counter()
        runs = {name: run_variant(name, Path(tmp) / name) for name in ["baseline", *names]}
        comparisons = {name: compare_runs(runs["baseline"], runs[name]) for name in names}
        wall = time.perf_counter() - t0
    for r in runs.values():
        for key in ("embeddings", "transformed", "clusters", "dataset"):
            r.pop(key)
    result = {
        "benchmark": "reproducibility",
        "config": "benchmarks.reproducibility.small_config: demo, 120 images, k=5, 1,200 train + 300 valid triplets "
                  "per strategy (cluster_border, between_class), seed 0",
        "variants": {name: {"env": VARIANTS[name][0], "changes": VARIANTS[name][1], **runs[name]}
                     for name in ["baseline", *names]},
        "against_baseline": comparisons,
        "summary": {name: c["dataset_summary"] for name, c in comparisons.items()},
        "wall_seconds": round(wall, 1),
        "machine": machine_info(),
    }
    write_result("reproducibility", result, args.out)
    return result


if __name__ == "__main__":
    main()

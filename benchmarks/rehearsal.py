"""A rehearsal of the whole pipeline on one GPU, stage by stage, without Prefect: seconds per stage and a
projection to the paper's scale (1.28M images → 10M triplets → a published dataset).

    python -m benchmarks.rehearsal          # on a CUDA GPU: 30,000 JPEGs, ViT-B/16, k = 500, 1M triplets, 200 steps
    python -m benchmarks.rehearsal --device cpu --images 240 --image-px 48 --model test_vit --k 4 \\
        --triplets 4000 --human 2000 --steps 2 --batch 4 --student test_vit --student-px 32   # dry run

The stages are called as the flows call them, minus Prefect (`alignet_core.<stage>.stage.run_*`, the
sampling shards in a process pool instead of on Dask), on one `PipelineConfig` under a temporary root:
0. images: `--images` 224-px JPEGs in 100 class folders (`benchmarks.embed.write_jpegs`, one process per
   core). Made once, before the clock of the pipeline starts; not projected.
1. embed: `run_embed`, the teacher `--model` (ViT-B/16, random init: nothing is downloaded) in bf16,
   batch 256, one DataLoader worker per core, float16 store. `steady_images_per_s`: the rows of every
   chunk after the first over the time between the first and the last chunk written.
2. transform: `run_transform` on `--human` proxy "human" triplets over the images (the taxonomy proxy of
   `transform.human.make_proxy_triplets` (class-boundary triplets of the class folders, drawn per fold), soft targets from its response
   model, written as THINGS files), then applied to the store chunk by chunk. The images are random colour
   fields and the teacher is untrained: the rehearsal times the computation, its accuracies mean nothing.
3. cluster: `run_cluster`, k = `--k` (torch k-means on the GPU when FAISS sees none).
4. sample: `plan_sample`, its shards of `cluster_border` triplets (`--triplets` train + 1% valid) by
   `--workers` processes (`run_sample_shard`), then `publish_sample` (official .npz files, Zarr copy,
   manifest, atomic rename).
5. distill: `train_student` for `--steps` steps of a ViT-B/16 student (random init) at 224 px, bf16,
   `--batch` triplets per step from the published train file, images decoded by loader workers each step,
   a checkpoint every 100 steps. (The stage's before/after evaluation is left out.)

Projection (`projection` in the JSON; every entry says its assumption):
- embed ∝ images at the measured steady rate; the paper's teacher (SigLIP So400m/14, 384 px) costs
  `so400m_flops_ratio` times ViT-B/16's FLOPs per image (both counted by FlopCounterMode on the meta
  device), reported beside it at the same FLOP rate.
- transform: the fit ∝ human triplets (THINGS: 4.7M, the same epochs); the apply ∝ images (timed once
  more on its own, and the fit's share is the stage's seconds less it).
- cluster: k-means trains on min(n, 256 k) rows (128,000 at k = 500), so the fit ∝ training rows; the
  assignment ∝ images (timed once more on its own, as the apply).
- sample ∝ triplets (× 10M / measured); publish ∝ triplets.
- regeneration = embed + transform + cluster + sample + publish, target ≤ 1 hour on one GPU;
  distillation reported apart: the paper's 100k steps × 512 triplets at the measured images/s.
Writes `benchmarks/results/gpu/rehearsal_gpu.json` on a GPU; `--device cpu` prints and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see benchmarks.embed)

import numpy as np
import torch

from alignet_core.cluster.kmeans import assign_clusters, load_kmeans
from alignet_core.cluster.stage import run_cluster
from alignet_core.config import PipelineConfig, parse_config
from alignet_core.context import RunContext
from alignet_core.config.distill import DistillConfig
from alignet_core.distill.train import train_student
from alignet_core.embed.stage import run_embed
from alignet_core.hardware import kmeans_backend
from alignet_core.config.human import HumanConfig
from alignet_core.human.triplets import apportion, make_proxy_triplets, object_folds
from alignet_core.io import formats, sources, store
from alignet_core.sample.stage import plan_sample, publish_sample, run_sample_shard
from alignet_core.transform.affine import AffineTransform, apply_transform_to_store
from alignet_core.transform.stage import FIT_FILE, run_transform
from benchmarks._machine import check_gpu_device, machine_info, report_gpu_result
from benchmarks.distill import mean_unique_images
from benchmarks.embed import write_jpegs

#: the paper's scale and the target for regenerating it on one GPU
PAPER_IMAGES, PAPER_TRIPLETS, THINGS_TRIPLETS = 1_281_167, 10_000_000, 4_700_000
PAPER_STEPS, PAPER_BATCH = 100_000, 512
TARGET_REGENERATION_S = 3600.0
SO400M = "vit_so400m_patch14_siglip_384"


def pipeline_config(args: argparse.Namespace, root: str, images: str, human: tuple[str, str]) -> PipelineConfig:
    """The rehearsal's config: the JPEG folder, the teacher, the proxy human files, k, the triplet counts."""
    return parse_config({
        "root": root, "dataset_name": "rehearsal", "seed": 0, "device": "cuda" if args.device.startswith("cuda") else "cpu",
        "source": {"kind": "folder", "path": images},
        "embed": {"model": args.model, "weights": None, "batch_size": args.embed_batch, "chunk_rows": 4 * args.embed_batch,
                  "num_workers": args.workers, "store_dtype": "float16"},
        "human": {"triplets": human[0], "probabilities": human[1], "positional": True},
        "transform": {"targets": "soft", "epochs": args.transform_epochs, "chunk_rows": 8192},
        "cluster": {"k": args.k, "niter": 20},
        "sample": {"strategies": ["cluster_border"], "n_train": args.triplets, "n_valid": max(100, args.triplets // 100),
                   "shard_size": max(1000, -(-args.triplets // (2 * args.workers)))},
    })


def write_proxy_human(src: sources.ImageSource, n: int, folder: Path, cfg: HumanConfig = HumanConfig(),
                      seed: int = 0) -> tuple[str, str]:
    """Proxy odd-one-out triplets over the images (object i = image i; class folders are the classes of
    one category, so the triplets are class-boundary ones) and their response probabilities, as THINGS
    files: (triplets path, probabilities path). Drawn inside each of `cfg`'s folds (as the demo proxy
    is), so every fold of the transform stage's rotation has test triplets and none is partial."""
    groups = np.unique(src.labels(), return_inverse=True)[1]
    fold_of = object_folds(len(groups), cfg.folds, seed)
    roles = [np.flatnonzero(fold_of == f) for f in range(cfg.folds)]
    counts = apportion({str(i): len(r) for i, r in enumerate(roles)}, n)
    parts = [make_proxy_triplets(np.zeros(len(groups), np.int64), groups, {"class_boundary": 1.0}, counts[str(i)],
                                 noise=0.1, seed=i, pool=pool)[:2] for i, pool in enumerate(roles)]
    triplets, probs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    paths = str(folder / "triplets.txt"), str(folder / "probabilities.npy")
    formats.write_things_triplets(paths[0], triplets)
    formats.write_probabilities(paths[1], probs)
    return paths


def _one_thread() -> None:
    torch.set_num_threads(1)  # one core per shard process, as the pipeline's Dask workers run


def run_shards(sp: Any, workers: int) -> float:
    """The sampling plan's shards on `workers` forked processes (the flow runs them on Dask); seconds.

    Forked after CUDA was initialised, as DataLoader workers are: the shards use no CUDA."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_one_thread) as pool:
        list(pool.map(run_sample_shard, [sp] * len(sp.specs), sp.specs))
    return time.perf_counter() - t0


def flops_per_image(model: str) -> float:
    """Forward FLOPs of one image through timm `model` at its own input size, counted on the meta device
    (no memory, no compute: the model is never materialised)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = timm.create_model(model, pretrained=False).eval()
        x = torch.empty(1, *m.pretrained_cfg["input_size"])
        with FlopCounterMode(display=False) as counter:  # (not under no_grad: its module tracker wants autograd)
            m.forward_head(m.forward_features(x), pre_logits=True)
    return float(counter.get_total_flops())


def run(args: argparse.Namespace) -> dict:
    """Every stage on `args.device`; seconds per stage, the projection (see the module doc)."""
    device = torch.device(args.device)
    root = Path(args.root or tempfile.mkdtemp(prefix="alignet-rehearsal-"))
    stages: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    folder = write_jpegs(root / "images", args.images, size=args.image_px, workers=args.workers)
    stages["images"] = {"seconds": round(time.perf_counter() - t0, 2), "images": args.images, "px": args.image_px}
    src = sources.folder_source(str(folder))
    human = write_proxy_human(src, args.human, root)
    cfg = pipeline_config(args, str(root / "data"), str(folder), human)

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    emb = run_embed(RunContext.of(cfg), progress=lambda done, total: stamps.append((time.perf_counter(), done)))
    seconds = time.perf_counter() - t0
    (t_a, rows_a), (t_b, rows_b) = stamps[0], stamps[-1]
    stages["embed"] = {"seconds": round(seconds, 2), "images": emb.metrics.n_images, "valid": emb.metrics.n_valid,
                       "dim": emb.metrics.dim, "chunks": len(stamps),
                       "steady_images_per_s": round((rows_b - rows_a) / (t_b - t_a), 1) if len(stamps) > 1 else None}

    t0 = time.perf_counter()
    tfm = run_transform(RunContext.of(cfg), emb)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # the apply alone once more (∝ images), to split the stage's time from the fit's
    apply_transform_to_store(emb.artifact, str(root / "apply-again.zarr"), AffineTransform.load(
        store.join(tfm.dir, FIT_FILE)), cfg.transform.chunk_rows, device)
    apply_s = time.perf_counter() - t0
    stages["transform"] = {"seconds": round(seconds, 2), "apply_seconds": round(apply_s, 2),
                           "human_triplets": args.human, "best_epoch": tfm.metrics.best_epoch,
                           "epochs_run": len(tfm.metrics.history)}

    t0 = time.perf_counter()
    clu = run_cluster(RunContext.of(cfg), tfm)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # the assignment alone once more (∝ images), to split the stage's time from the fit's
    assign_clusters(tfm.artifact, load_kmeans(clu.dir).centroids, cfg.cluster.chunk_rows, cfg.cluster.spherical,
                    cfg.cluster.use_gpu)
    stages["cluster"] = {"seconds": round(seconds, 2), "assign_seconds": round(time.perf_counter() - t0, 2),
                         "k": clu.metrics.k, "backend": dataclasses.asdict(kmeans_backend(cfg.cluster.use_gpu)),
                         "train_rows": min(emb.metrics.n_valid, args.k * cfg.cluster.max_points_per_centroid),
                         "sizes_min_max": [min(clu.metrics.sizes), max(clu.metrics.sizes)]}

    t0 = time.perf_counter()
    sp = plan_sample(RunContext.of(cfg), tfm, clu)
    shards_s = run_shards(sp, args.workers)
    t1 = time.perf_counter()
    ds = publish_sample(RunContext.of(cfg), sp)
    publish_s = time.perf_counter() - t1
    stages["sample"] = {"seconds": round(t1 - t0, 2), "shards_seconds": round(shards_s, 2), "shards": len(sp.specs),
                        "triplets_requested": args.triplets, "workers": args.workers}
    stages["publish"] = {"seconds": round(publish_s, 2), "triplets": ds.metrics.n_triplets,
                         "files": sorted(ds.metrics.files)}

    split = formats.read_alignet_npz(_train_file(ds.artifact), len(src))
    dcfg = DistillConfig(student=args.student, weights=None, image_size=args.student_px, steps=args.steps,
                         batch_triplets=args.batch, warmup_steps=max(1, args.steps // 10), lr=3e-5,
                         checkpoint_every=100, num_workers=args.workers)
    step_times: dict[int, float] = {}
    t0 = time.perf_counter()
    log = train_student(split, src, dcfg, str(root / "student"), device, seed=0,
                        progress=lambda s, _l: step_times.__setitem__(s, time.perf_counter()))
    first = min(args.steps - 1, 10)  # from step 10 on: loader workers started, kernels chosen
    steady = (args.steps - first) / (step_times[args.steps] - step_times[first])
    stages["distill"] = {"seconds": round(time.perf_counter() - t0, 2), "steps": args.steps, "batch_triplets": args.batch,
                         "train_triplets": len(split), "loop_seconds": log["seconds"], "final_loss": log["final_loss"],
                         "steady_steps_per_s": round(steady, 3), "timed_from_step": first,
                         "images_per_step": mean_unique_images(dcfg, split, src, 0, range(first, args.steps))}
    result = {
        "benchmark": "rehearsal_gpu", "device": str(device), "teacher": args.model, "student": args.student,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32 (CPU dry run)",
        "stages": stages,
        "pipeline_seconds": round(sum(v["seconds"] for k, v in stages.items() if k != "images"), 2),
        "projection": projection(stages, args),
        "root": str(root),
        "machine": machine_info(),
    }
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _train_file(folder: str) -> str:
    """The published train file of the rehearsal's one sampling."""
    found = sorted(Path(folder).glob("train_*.npz"))
    if len(found) != 1:
        raise SystemExit(f"expected one train_*.npz in {folder}, found {[p.name for p in found]}")
    return str(found[0])


def projection(stages: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict:
    """Seconds at 1.28M images / 10M triplets on the same GPU, each with its assumption (see the module doc)."""
    n = stages["embed"]["images"]
    rate = stages["embed"]["steady_images_per_s"] or n / stages["embed"]["seconds"]
    t, c = stages["transform"], stages["cluster"]
    paper_train_rows = min(PAPER_IMAGES, args.k * 256)
    triplets = max(1, stages["publish"]["triplets"])
    out: dict[str, Any] = {
        "embed": {"seconds": round(PAPER_IMAGES / rate, 1),
                  "assumption": f"∝ images at the measured steady {rate:.0f} images/s ({args.model})"},
        "transform": {"seconds": round((t["seconds"] - t["apply_seconds"]) * THINGS_TRIPLETS / args.human
                                       + t["apply_seconds"] * PAPER_IMAGES / n, 1),
                      "assumption": f"fit ∝ human triplets (THINGS' {THINGS_TRIPLETS:,} vs the rehearsal's {args.human:,}, "
                                    "same epochs); apply ∝ images"},
        "cluster": {"seconds": round((c["seconds"] - c["assign_seconds"]) * paper_train_rows / c["train_rows"]
                                     + c["assign_seconds"] * PAPER_IMAGES / n, 1),
                    "assumption": f"fit ∝ training rows ({c['train_rows']:,} → {paper_train_rows:,} = 256 k); "
                                  "assignment ∝ images"},
        "sample": {"seconds": round(stages["sample"]["seconds"] * PAPER_TRIPLETS / triplets, 1),
                   "assumption": f"∝ triplets ({triplets:,} → {PAPER_TRIPLETS:,}) on the same {args.workers} processes"},
        "publish": {"seconds": round(stages["publish"]["seconds"] * PAPER_TRIPLETS / triplets, 1),
                    "assumption": "∝ triplets"},
    }
    total = sum(v["seconds"] for v in out.values())
    out["regeneration_seconds"] = round(total, 1)
    out["target_seconds"] = TARGET_REGENERATION_S
    out["meets_target"] = total <= TARGET_REGENERATION_S
    d = stages["distill"]
    images_s = d["steady_steps_per_s"] * d["images_per_step"]
    out["distill_paper_schedule"] = {
        "seconds": round(PAPER_STEPS * 3 * PAPER_BATCH / images_s, 0),
        "assumption": f"{PAPER_STEPS:,} steps × {PAPER_BATCH} triplets (≈ {3 * PAPER_BATCH} distinct images each) at the "
                      f"measured {images_s:.0f} images/s ({args.student}, {args.student_px} px); not part of the regeneration"}
    try:
        ratio = flops_per_image(SO400M) / flops_per_image(args.model)
    except Exception as err:  # noqa: BLE001 — a model timm does not know, or one the meta device cannot trace
        out["so400m_embed"] = {"error": f"{type(err).__name__}: {err}"}
    else:
        out["so400m_embed"] = {
            "seconds": round(PAPER_IMAGES / rate * ratio, 1), "flops_ratio": round(ratio, 2),
            "assumption": f"the paper's teacher {SO400M} at the FLOP rate {args.model} ran at "
                          f"({ratio:.1f}× its forward FLOPs per image)"}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="'cuda' / 'cuda:<i>', or 'cpu' for a dry run (printed, never written)")
    p.add_argument("--images", type=int, default=30_000, help="JPEGs to make and embed")
    p.add_argument("--image-px", type=int, default=224, help="their size")
    p.add_argument("--model", default="vit_base_patch16_224", help="the teacher (random init)")
    p.add_argument("--embed-batch", type=int, default=256, help="embed.batch_size")
    p.add_argument("--human", type=int, default=100_000, help="proxy human triplets for the transform")
    p.add_argument("--transform-epochs", type=int, default=8, help="transform.epochs")
    p.add_argument("--k", type=int, default=500, help="cluster.k")
    p.add_argument("--triplets", type=int, default=1_000_000, help="sample.n_train (cluster_border)")
    p.add_argument("--student", default="vit_base_patch16_224", help="the student (random init)")
    p.add_argument("--student-px", type=int, default=224, help="distill.image_size")
    p.add_argument("--steps", type=int, default=200, help="distillation steps")
    p.add_argument("--batch", type=int, default=128, help="distill.batch_triplets")
    p.add_argument("--workers", type=int, default=None, help="processes for JPEGs, loaders, shards (default: cores)")
    p.add_argument("--root", default=None, help="working folder (default: a temporary one, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    args = p.parse_args(argv)
    check_gpu_device(p, args.device, "--device cpu with small sizes (see the module doc)")
    args.workers = args.workers or len(os.sched_getaffinity(0))
    os.environ.setdefault("TQDM_DISABLE", "1")
    report_gpu_result("rehearsal_gpu", run(args), args.device)


if __name__ == "__main__":
    main()
